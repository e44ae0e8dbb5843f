// voxgen's web page: plain JavaScript against the JSON API (no build step).  NiiVue (vendored UMD
// bundle, global `niivue`) draws the volumes.  All URLs are relative, so the page also works when
// the API is served under a path prefix.
"use strict";

(() => {
  const NV = window.niivue;
  const $ = (id) => document.getElementById(id);
  // Jobs are followed by long poll (GET /jobs/{id}?wait=S): the answer comes as soon as the job
  // ends; while it runs, one request every WAIT_S seconds refreshes the progress bar.
  const WAIT_S = 2;
  const CT_PRESETS = [
    ["Soft tissue (W 400, L 40)", 400, 40],
    ["Lung (W 1500, L -600)", 1500, -600],
    ["Bone (W 1800, L 400)", 1800, 400],
    ["Brain (W 80, L 40)", 80, 40],
  ];
  const VIEWABLE = /\.(nii|nii\.gz|nrrd|nhdr|mha|mhd)$/i;

  const state = {
    models: [],
    model: null, // the selected model's description from GET /models
    nv: null, // the main NiiVue viewer
    shown: null, // {jobId, name, model} of the volume in the main viewer
    wl: null, // {window, level} chosen by the user, kept across traverse steps
    traverse: null, // the last traverse job's status
    encode: null, // {jobId, model} of the last succeeded encode job
    encodeViewers: null,
    cardFor: null, // the model whose card was asked for last (answers for others are dropped)
  };

  // ----------------------------------------------------------------------------- API helpers
  function describeError(status, body) {
    const detail = body && body.detail;
    if (Array.isArray(detail)) {
      return `${status}: ` + detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
    }
    return `${status}: ${typeof detail === "string" ? detail : JSON.stringify(body)}`;
  }

  async function api(path, options) {
    const r = await fetch(path, options);
    const text = await r.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (e) {
      body = text;
    }
    if (!r.ok) throw new Error(describeError(r.status, body));
    return body;
  }

  const postJson = (path, body) =>
    api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const fileUrl = (jobId, name) => `jobs/${jobId}/files/${encodeURIComponent(name)}`;
  const absolute = (url) => new URL(url, document.baseURI).href;
  const fmt = (x) => (typeof x === "number" ? (Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(4)) : "—");

  // Run one job: submit, then long-poll GET /jobs/{id} and show its progress until it ends.  The job box
  // carries data-state / data-job-id so scripts (and the tests) can follow it.  Returns the final
  // status when it succeeded, otherwise null (the reason is shown).
  async function runJob(prefix, submit) {
    const box = $(`${prefix}-job`);
    const bar = $(`${prefix}-progress`);
    const status = $(`${prefix}-status`);
    const cancel = $(`${prefix}-cancel`);
    const button = $(`${prefix}-button`);
    box.hidden = false;
    box.dataset.state = "submitting";
    delete box.dataset.jobId;
    status.classList.remove("error");
    status.textContent = "submitting…";
    bar.removeAttribute("value");
    button.disabled = true;
    const t0 = performance.now();
    try {
      const accepted = await submit();
      const id = accepted.job_id;
      box.dataset.jobId = id;
      cancel.hidden = false;
      cancel.onclick = () => api(`jobs/${id}`, { method: "DELETE" }).catch(() => {});
      for (;;) {
        const s = await api(`jobs/${id}?wait=${WAIT_S}`);
        box.dataset.state = s.state;
        const p = s.progress || { done: 0, total: 0, stage: "" };
        if (p.total > 0) {
          bar.max = p.total;
          bar.value = p.done;
        }
        if (s.state === "succeeded") {
          bar.max = 1;
          bar.value = 1;
          status.textContent = `done in ${((performance.now() - t0) / 1000).toFixed(1)} s (job ${id.slice(0, 8)})`;
          return s;
        }
        if (s.state === "failed" || s.state === "cancelled") {
          throw new Error(s.state === "failed" ? `failed: ${s.error || "no reason given"}` : "cancelled");
        }
        const stage = p.stage ? ` ${p.stage}` : "";
        status.textContent = `${s.state}${stage}${p.total > 0 ? ` ${p.done}/${p.total}` : ""}`;
      }
    } catch (e) {
      box.dataset.state = box.dataset.state === "cancelled" ? "cancelled" : "error";
      status.classList.add("error");
      status.textContent = e.message;
      return null;
    } finally {
      button.disabled = false;
      cancel.hidden = true;
    }
  }

  // ----------------------------------------------------------------------------- models
  function modelByName(name) {
    return state.models.find((m) => m.name === name) || null;
  }

  function fillSelect(select, values, labelOf) {
    select.replaceChildren(
      ...values.map((v) => {
        const o = document.createElement("option");
        o.value = v;
        o.textContent = labelOf ? labelOf(v) : v;
        return o;
      }),
    );
  }

  function onModelChange() {
    const m = modelByName($("model-select").value);
    state.model = m;
    if (!m) return;
    const shape = (m.output_shape || []).join(" × ");
    const spacing = (m.spacing || []).map((s) => +s.toFixed(3)).join(" × ");
    const parts = [
      m.family,
      shape && `${shape} voxels`,
      m.modality && m.modality.toUpperCase(),
      spacing && `${spacing} mm`,
      m.latent_dim && `latent ${m.latent_dim}`,
    ].filter(Boolean);
    $("model-info").textContent = parts.join(", ") + (m.description ? `. ${m.description}` : "");
    const classes = m.classes || [];
    $("label-field").hidden = classes.length === 0;
    fillSelect($("label-select"), classes);
    const dirs = m.directions || [];
    $("traverse-section").hidden = dirs.length === 0;
    fillSelect($("direction-select"), dirs);
    updateTraverseSources();
    loadCard(m);
  }

  // ----------------------------------------------------------------------------- model cards
  // GET /models/{name}/card (markdown) shown by renderMarkdown: the card's text never becomes HTML.
  // (GET /models says whether a model has one: card_url.)
  async function loadCard(m) {
    const name = m.name;
    state.cardFor = name;
    const box = $("model-card");
    const body = $("model-card-body");
    box.dataset.state = "loading";
    let text = null;
    let problem = null;
    if (m.card_url) {
      try {
        const r = await fetch(`models/${encodeURIComponent(name)}/card`); // relative: works under a prefix
        if (r.ok) text = await r.text();
        else problem = `the card could not be loaded (${r.status})`;
      } catch (e) {
        problem = `the card could not be loaded (${e.message})`;
      }
    }
    if (state.cardFor !== name) return; // another model was chosen meanwhile
    $("model-card-name").textContent = name;
    if (text === null) {
      body.replaceChildren(document.createTextNode(problem || "This model has no model card."));
      box.dataset.state = problem ? "error" : "none";
    } else {
      renderMarkdown(text, body);
      box.dataset.state = "shown";
    }
    box.dataset.model = name;
  }

  // A small markdown renderer for model cards.  It builds DOM nodes and sets text with textContent /
  // text nodes only, so nothing in a card (raw HTML, script, event attributes) is ever parsed as
  // markup.  Headings, paragraphs, bullet and numbered lists, fenced code, tables, block quotes,
  // rules, **bold**, *italic*, `code`; absolute http(s) links open in a new tab, other links and
  // images (not served here) are shown as their text.
  function el(tag, cls) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    return e;
  }

  const INLINE =
    /`([^`]+)`|!\[([^\]]*)\]\(([^)\s]*)[^)]*\)|\[([^\]]+)\]\(([^)\s]*)[^)]*\)|\*\*(.+?)\*\*|\*([^*\s](?:[^*]*[^*\s])?)\*|<(https?:\/\/[^>\s]+)>/g;

  function inline(text, parent) {
    const re = new RegExp(INLINE.source, "g");
    let last = 0;
    let m;
    while ((m = re.exec(text))) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      if (m[1] !== undefined) {
        const c = el("code");
        c.textContent = m[1];
        parent.append(c);
      } else if (m[3] !== undefined) {
        parent.append(`[image: ${m[2] || m[3]}]`);
      } else if (m[5] !== undefined) {
        link(m[4], m[5], parent);
      } else if (m[6] !== undefined) {
        const b = el("strong");
        inline(m[6], b);
        parent.append(b);
      } else if (m[7] !== undefined) {
        const i = el("em");
        inline(m[7], i);
        parent.append(i);
      } else if (m[8] !== undefined) {
        link(m[8], m[8], parent);
      }
      last = re.lastIndex;
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  function link(text, url, parent) {
    if (/^https?:\/\//i.test(url)) {
      const a = el("a");
      a.href = url;
      a.rel = "noopener noreferrer";
      a.target = "_blank";
      inline(text, a);
      parent.append(a);
    } else {
      const span = el("span", "card-link");
      span.title = url;
      inline(text, span);
      parent.append(span);
    }
  }

  function splitRow(line) {
    let t = line.trim();
    if (t.startsWith("|")) t = t.slice(1);
    if (t.endsWith("|") && !t.endsWith("\\|")) t = t.slice(0, -1);
    return t.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
  }

  const FENCE = /^\s*(```|~~~)/;
  const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const isBlank = (l) => /^\s*$/.test(l);
  const isTableAt = (lines, i) =>
    /^\s*\|/.test(lines[i]) && i + 1 < lines.length && /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/.test(lines[i + 1]);
  const startsBlock = (lines, i) =>
    FENCE.test(lines[i]) || HEADING.test(lines[i]) || RULE.test(lines[i]) || ITEM.test(lines[i]) ||
    /^\s*>/.test(lines[i]) || isTableAt(lines, i);

  function renderBlocks(lines) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (isBlank(line)) {
        i++;
      } else if ((m = FENCE.exec(line))) {
        const code = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) code.push(lines[i]);
        i++;
        const pre = el("pre");
        const c = el("code");
        c.textContent = code.join("\n");
        pre.append(c);
        out.push(pre);
      } else if ((m = HEADING.exec(line))) {
        const h = el(`h${Math.min(6, m[1].length + 2)}`); // a card's "#" sits below the page's own headings
        inline(m[2], h);
        out.push(h);
        i++;
      } else if (RULE.test(line)) {
        out.push(el("hr"));
        i++;
      } else if (isTableAt(lines, i)) {
        const table = el("table");
        const head = el("thead");
        const tr = el("tr");
        for (const cell of splitRow(line)) {
          const th = el("th");
          th.scope = "col";
          inline(cell, th);
          tr.append(th);
        }
        head.append(tr);
        const body = el("tbody");
        for (i += 2; i < lines.length && /^\s*\|/.test(lines[i]); i++) {
          const row = el("tr");
          for (const cell of splitRow(lines[i])) {
            const td = el("td");
            inline(cell, td);
            row.append(td);
          }
          body.append(row);
        }
        table.append(head, body);
        out.push(table);
      } else if (/^\s*>/.test(line)) {
        const quoted = [];
        for (; i < lines.length && /^\s*>/.test(lines[i]); i++) quoted.push(lines[i].replace(/^\s*>\s?/, ""));
        const q = el("blockquote");
        q.append(...renderBlocks(quoted));
        out.push(q);
      } else if ((m = ITEM.exec(line))) {
        const ordered = /\d/.test(m[2]);
        const list = el(ordered ? "ol" : "ul");
        const indent = m[1].length;
        while (i < lines.length) {
          let it = ITEM.exec(lines[i]);
          if (!it || /\d/.test(it[2]) !== ordered || it[1].length > indent + 1) break;
          const parts = [it[3]];
          for (i++; i < lines.length && !isBlank(lines[i]) && !ITEM.test(lines[i]) && !startsBlock(lines, i); i++) {
            parts.push(lines[i].trim());
          }
          const li = el("li");
          inline(parts.join(" "), li);
          list.append(li);
          // an indented (nested) list belongs to this item
          if (i < lines.length && (it = ITEM.exec(lines[i])) && it[1].length > indent + 1) {
            const nested = [];
            while (i < lines.length && !isBlank(lines[i]) && /^\s{2,}/.test(lines[i])) nested.push(lines[i++].slice(indent + 2));
            li.append(...renderBlocks(nested));
          }
          while (i < lines.length && isBlank(lines[i]) && i + 1 < lines.length && ITEM.test(lines[i + 1])) i++;
        }
        out.push(list);
      } else {
        const para = [];
        for (; i < lines.length && !isBlank(lines[i]) && !startsBlock(lines, i); i++) para.push(lines[i].trim());
        const p = el("p");
        inline(para.join(" "), p);
        out.push(p);
      }
    }
    return out;
  }

  function renderMarkdown(markdown, into) {
    into.replaceChildren(...renderBlocks(String(markdown).replace(/\r\n?/g, "\n").split("\n")));
  }

  function updateTraverseSources() {
    const select = $("traverse-source");
    const options = [["seed", "the seed in the Generate form"]];
    if (state.encode && state.model && state.encode.model === state.model.name) {
      options.push(["encode", `the encoded scan (job ${state.encode.jobId.slice(0, 8)})`]);
    }
    const previous = select.value;
    fillSelect(
      select,
      options.map((o) => o[0]),
      (v) => options.find((o) => o[0] === v)[1],
    );
    if (options.some((o) => o[0] === previous)) select.value = previous;
  }

  function withLabel(body) {
    if (state.model && (state.model.classes || []).length) body.label = $("label-select").value;
    return body;
  }

  async function loadModels() {
    try {
      state.models = await api("models");
    } catch (e) {
      $("model-info").textContent = `Could not list the models: ${e.message}`;
      return;
    }
    if (state.models.length === 0) {
      $("model-info").textContent = "This service has no models (put a model directory in its models folder).";
      $("generate-button").disabled = true;
      $("encode-button").disabled = true;
      return;
    }
    fillSelect(
      $("model-select"),
      state.models.map((m) => m.name),
    );
    onModelChange();
    document.body.dataset.ready = "true";
  }

  // ----------------------------------------------------------------------------- the viewer
  function newViewer() {
    return new NV.Niivue({
      backColor: [0, 0, 0, 1],
      show3Dcrosshair: true,
      multiplanarShowRender: NV.SHOW_RENDER.ALWAYS,
      multiplanarLayout: NV.MULTIPLANAR_TYPE.GRID,
      isRadiologicalConvention: false,
      dragAndDropEnabled: false,
      logLevel: "warn",
    });
  }

  // The slice type the View radio buttons ask for.
  function chosenSliceType() {
    const checked = document.querySelector('input[name="view"]:checked');
    const types = {
      multi: NV.SLICE_TYPE.MULTIPLANAR,
      axial: NV.SLICE_TYPE.AXIAL,
      coronal: NV.SLICE_TYPE.CORONAL,
      sagittal: NV.SLICE_TYPE.SAGITTAL,
      render: NV.SLICE_TYPE.RENDER,
    };
    return types[checked ? checked.value : "multi"];
  }

  async function mainViewer() {
    if (state.nv) return state.nv;
    const nv = newViewer();
    await nv.attachToCanvas($("viewer"));
    // the view chosen so far, also when it was chosen before the first volume (the viewer did not exist)
    nv.setSliceType(chosenSliceType());
    nv.onIntensityChange = (vol) => {
      // NiiVue's own contrast drag: mirror it in the controls
      state.wl = { window: vol.cal_max - vol.cal_min, level: (vol.cal_max + vol.cal_min) / 2 };
      $("wl-preset").value = "custom";
      showWindowInputs();
    };
    nv.onLocationChange = () => showSlicePosition();
    const canvas = $("viewer");
    canvas.addEventListener("mousemove", (ev) => showPointerValue(ev));
    canvas.addEventListener("mouseleave", () => showPointerValue(null));
    state.nv = nv;
    return nv;
  }

  // ----------------------------------------------------------------------------- readouts
  // The voxel under a point of the viewer: NiiVue's own mapping (screen -> texture fraction -> mm
  // -> the volume's RAS voxel), as its location readout does.  null outside the volume's slices.
  function voxelAt(nv, frac) {
    if (!nv || nv.volumes.length === 0 || !frac || frac[0] < 0) return null;
    const vol = nv.volumes[0];
    const mm = nv.frac2mm(frac, 0, true);
    const vox = Array.from(vol.mm2vox(mm));
    const dims = vol.dimsRAS.slice(1, 4);
    if (vox.some((v, k) => v < 0 || v >= dims[k])) return null;
    const value = vol.intensityRaw2Scaled(vol.getValue(vox[0], vox[1], vox[2]));
    return { vox, mm: [mm[0], mm[1], mm[2]], dims, value };
  }

  function unitsOf(modelName) {
    const m = modelByName(modelName);
    return (m && m.intensity && m.intensity.units) || "";
  }

  const fmtValue = (v) => (Number.isInteger(v) ? String(v) : Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4));
  const fmtMM = (x) => (Math.abs(x) < 0.005 ? "0.00" : x.toFixed(2));

  // The value under the pointer, in the model's units (HU for CT), with its voxel and position.
  function showPointerValue(ev) {
    const out = $("viewer-pointer");
    const nv = state.nv;
    let at = null;
    if (ev && nv && nv.volumes.length) {
      const canvas = $("viewer");
      const rect = canvas.getBoundingClientRect();
      const x = ((ev.clientX - rect.left) * canvas.width) / rect.width;
      const y = ((ev.clientY - rect.top) * canvas.height) / rect.height;
      at = voxelAt(nv, nv.canvasPos2frac([x, y]));
    }
    if (!at) {
      out.textContent = nv && nv.volumes.length ? "Pointer: outside the slices" : "Pointer: —";
      delete out.dataset.vox;
      delete out.dataset.value;
      return;
    }
    const units = unitsOf(state.shown && state.shown.model);
    out.textContent =
      `Pointer: ${fmtValue(at.value)}${units ? ` ${units}` : ""} at voxel (${at.vox.join(", ")}), ` +
      `(${at.mm.map(fmtMM).join(", ")}) mm RAS`;
    out.dataset.vox = at.vox.join(",");
    out.dataset.value = String(at.value);
  }

  // Where the crosshair is: the axial, coronal and sagittal slice shown, by index and in mm.
  function showSlicePosition() {
    const out = $("viewer-slices");
    const nv = state.nv;
    const at = nv && nv.volumes.length ? voxelAt(nv, nv.scene.crosshairPos) : null;
    if (!at) {
      out.textContent = "Slices: —";
      return;
    }
    const [i, j, k] = at.vox;
    const [nx, ny, nz] = at.dims;
    const [x, y, z] = at.mm.map(fmtMM);
    const units = unitsOf(state.shown && state.shown.model);
    out.textContent =
      `Slices: axial ${k} of 0–${nz - 1} (z = ${z} mm), coronal ${j} of 0–${ny - 1} (y = ${y} mm), ` +
      `sagittal ${i} of 0–${nx - 1} (x = ${x} mm); crosshair value ${fmtValue(at.value)}${units ? ` ${units}` : ""}`;
    out.dataset.vox = at.vox.join(",");
    out.dataset.mm = at.mm.join(",");
  }

  function isCT(model) {
    return Boolean(model && model.modality === "ct");
  }

  // The model's own intensity range (the range it was trained in) as [label, window, level], or null.
  function modelPreset(model) {
    const it = model && model.intensity;
    if (!it || !Number.isFinite(it.lo) || !Number.isFinite(it.hi) || it.hi <= it.lo) return null;
    return [`Model range (${fmt(it.lo)} to ${fmt(it.hi)} ${it.units || ""})`, it.hi - it.lo, (it.hi + it.lo) / 2];
  }

  // The 1st and 99.5th percentiles of a loaded volume in physical units (the MRI scaling of the PNG
  // previews), from a sample of at most ~200k voxels; null for an empty volume.
  function percentileRange(vol) {
    const img = vol.img;
    if (!img || img.length === 0) return null;
    const stride = Math.max(1, Math.floor(img.length / 200000));
    const sample = new Float64Array(Math.ceil(img.length / stride));
    let n = 0;
    for (let i = 0; i < img.length; i += stride) {
      if (Number.isFinite(img[i])) sample[n++] = img[i];
    }
    if (n === 0) return null;
    const sorted = sample.subarray(0, n).sort();
    const slope = Number.isFinite(vol.hdr.scl_slope) && vol.hdr.scl_slope !== 0 ? vol.hdr.scl_slope : 1;
    const inter = Number.isFinite(vol.hdr.scl_inter) ? vol.hdr.scl_inter : 0;
    const at = (q) => sorted[Math.min(n - 1, Math.floor(q * (n - 1)))] * slope + inter;
    const [a, b] = [at(0.01), at(0.995)].sort((x, y) => x - y);
    return [a, b];
  }

  // Presets for the loaded volume: the model's own intensity range, the volume's percentile range,
  // and for CT the usual Hounsfield windows.  Values: [label, window, level].
  function windowPresets(vol, model) {
    const presets = [];
    const own = modelPreset(model);
    if (own) presets.push(own);
    const range = percentileRange(vol);
    if (range && range[1] > range[0]) {
      presets.push(["1st to 99.5th percentile of this volume", range[1] - range[0], (range[1] + range[0]) / 2]);
    }
    if (isCT(model)) presets.push(...CT_PRESETS);
    return presets;
  }

  function setupWindowControls(vol, model) {
    const presets = windowPresets(vol, model);
    const select = $("wl-preset");
    select.replaceChildren();
    presets.forEach(([label, w, l], i) => {
      const o = document.createElement("option");
      o.value = String(i);
      o.textContent = label;
      o.dataset.window = String(w);
      o.dataset.level = String(l);
      select.append(o);
    });
    const custom = document.createElement("option");
    custom.value = "custom";
    custom.textContent = "Custom";
    select.append(custom);
    const gmin = Math.min(vol.global_min, vol.cal_min);
    const gmax = Math.max(vol.global_max, vol.cal_max);
    const win = $("wl-window");
    const lev = $("wl-level");
    if (isCT(model)) {
      win.min = "1";
      win.max = "4000";
      win.step = "1";
      lev.min = "-1024";
      lev.max = "3071";
      lev.step = "1";
    } else {
      const span = Math.max(gmax - gmin, 1e-6);
      win.min = String(span / 500);
      win.max = String(span * 2);
      win.step = String(span / 500);
      lev.min = String(gmin);
      lev.max = String(gmax);
      lev.step = String(span / 500);
    }
    $("window-controls").disabled = false;
  }

  function showWindowInputs() {
    if (!state.wl) return;
    $("wl-window").value = String(state.wl.window);
    $("wl-level").value = String(state.wl.level);
    $("wl-window-out").textContent = fmt(state.wl.window);
    $("wl-level-out").textContent = fmt(state.wl.level);
  }

  function applyWindow() {
    const nv = state.nv;
    if (!nv || nv.volumes.length === 0 || !state.wl) return;
    const vol = nv.volumes[0];
    vol.cal_min = state.wl.level - state.wl.window / 2;
    vol.cal_max = state.wl.level + state.wl.window / 2;
    nv.updateGLVolume();
    showWindowInputs();
  }

  function choosePreset() {
    const o = $("wl-preset").selectedOptions[0];
    if (!o || o.value === "custom") return;
    state.wl = { window: +o.dataset.window, level: +o.dataset.level };
    applyWindow();
  }

  function onWindowInput() {
    state.wl = { window: +$("wl-window").value, level: +$("wl-level").value };
    $("wl-preset").value = "custom";
    applyWindow();
  }

  // Show a result volume in the main viewer.  keepWindow: keep the user's window/level (traverse
  // steps are compared at the same contrast); otherwise the model's intensity range.  The window is
  // given to the loader, so the volume's textures are built once.  The canvas gets
  // data-volume="<job>/<name>" once the volume is loaded and drawn.  model: the job's model description.
  async function showVolume(jobId, name, title, keepWindow, model) {
    const nv = await mainViewer();
    const canvas = $("viewer");
    canvas.dataset.loading = `${jobId}/${name}`;
    const own = modelPreset(model);
    let wl = null;
    const sameModel = state.shown && model && state.shown.model === model.name;
    if (keepWindow && state.wl && sameModel) wl = state.wl;
    else if (own) wl = { window: own[1], level: own[2] };
    const options = { url: absolute(fileUrl(jobId, name)), name, colormap: "gray" };
    if (wl) Object.assign(options, { cal_min: wl.level - wl.window / 2, cal_max: wl.level + wl.window / 2 });
    await nv.loadVolumes([options]);
    const vol = nv.volumes[0];
    setupWindowControls(vol, model);
    state.wl = { window: vol.cal_max - vol.cal_min, level: (vol.cal_max + vol.cal_min) / 2 };
    // the preset that gives this window, if any (the presets are those of this volume)
    const close = (a, b) => Math.abs(a - b) <= 1e-6 * Math.max(1, Math.abs(a), Math.abs(b));
    const match = [...$("wl-preset").options].find(
      (o) => o.value !== "custom" && close(+o.dataset.window, state.wl.window) && close(+o.dataset.level, state.wl.level),
    );
    $("wl-preset").value = match ? match.value : "custom";
    showWindowInputs();
    nv.drawScene();
    state.shown = { jobId, name, model: model && model.name };
    showSlicePosition();
    $("viewer-title").textContent = title;
    const link = $("download-link");
    link.href = fileUrl(jobId, name);
    link.setAttribute("download", name);
    link.textContent = `Download ${name}`;
    link.hidden = false;
    const png = name.replace(/\.nii(\.gz)?$/, ".png");
    $("preview-img").src = fileUrl(jobId, png);
    $("preview-figure").hidden = false;
    canvas.dataset.volume = `${jobId}/${name}`;
    delete canvas.dataset.loading;
  }

  // Latest wins: while a volume loads, further requests replace each other and only the last runs.
  let loading = false;
  let pending = null;
  async function requestVolume(...args) {
    pending = args;
    if (loading) return;
    loading = true;
    try {
      while (pending) {
        const next = pending;
        pending = null;
        try {
          await showVolume(...next);
        } catch (e) {
          $("viewer-title").textContent = `Could not show ${next[1]}: ${e.message}`;
        }
      }
    } finally {
      loading = false;
    }
  }

  // Before the first volume there is no viewer yet: mainViewer() applies the choice when it makes one.
  function onViewChange() {
    if (state.nv) state.nv.setSliceType(chosenSliceType());
  }

  function onConventionChange() {
    const radiological = $("radiological").checked;
    for (const nv of [state.nv, ...(state.encodeViewers || [])]) {
      if (nv) nv.setRadiologicalConvention(radiological);
    }
    $("convention-note").textContent = radiological
      ? "Radiological convention: the patient's right is on the screen's left."
      : "Neurological convention: the patient's right is on the screen's right.";
  }

  // ----------------------------------------------------------------------------- generate
  async function onGenerate(ev) {
    ev.preventDefault();
    const seed = Number($("seed-input").value);
    if (!Number.isSafeInteger(seed) || seed < 0) {
      $("generate-job").hidden = false;
      $("generate-status").textContent = "the seed must be a whole number ≥ 0";
      $("generate-status").classList.add("error");
      return;
    }
    const model = state.model.name;
    const body = withLabel({ model, seed, n: 1 });
    const s = await runJob("generate", () => postJson("generate", body));
    if (!s) return;
    const nifti = s.result.files.find((f) => f.name.endsWith(".nii.gz"));
    if (!nifti) return;
    const label = body.label;
    const what = `${model}, seed ${s.result.seed ?? seed}${label ? `, class ${label}` : ""}`;
    await requestVolume(s.job_id, nifti.name, `Generated: ${what} (${nifti.name})`, false, modelByName(model));
  }

  // ----------------------------------------------------------------------------- traverse
  function linspace(a, b, n) {
    if (n === 1) return [a];
    return Array.from({ length: n }, (_, i) => a + ((b - a) * i) / (n - 1));
  }

  async function onTraverse(ev) {
    ev.preventDefault();
    const a = Number($("alpha-from").value);
    const b = Number($("alpha-to").value);
    const n = Math.round(Number($("alpha-n").value));
    const body = withLabel({
      model: state.model.name,
      direction: $("direction-select").value,
      steps: linspace(a, b, n).map((x) => +x.toFixed(6)),
    });
    if ($("traverse-source").value === "encode" && state.encode) body.job_id = state.encode.jobId;
    else body.seed = Number($("seed-input").value);
    $("traverse-result").hidden = true;
    const s = await runJob("traverse", () => postJson("traverse", body));
    if (!s) return;
    state.traverse = s;
    const steps = s.result.steps || [];
    const tbody = $("steps-table").querySelector("tbody");
    tbody.replaceChildren(
      ...steps.map((st, i) => {
        const tr = document.createElement("tr");
        for (const text of [String(i), fmt(st.alpha), fmt(st.predicted), fmt(st.measured)]) {
          const td = document.createElement("td");
          td.textContent = text;
          tr.append(td);
        }
        return tr;
      }),
    );
    const attr = s.result.attribute;
    $("steps-table").querySelector("caption").textContent = attr
      ? `${attr} per step`
      : "Steps along the direction";
    const slider = $("step-slider");
    slider.max = String(Math.max(steps.length - 1, 0));
    // start at the step closest to the starting latent (alpha 0)
    let start = 0;
    steps.forEach((st, i) => {
      if (Math.abs(st.alpha) < Math.abs(steps[start].alpha)) start = i;
    });
    slider.value = String(start);
    $("traverse-result").hidden = false;
    showStep();
  }

  function showStep() {
    const s = state.traverse;
    if (!s) return;
    const steps = s.result.steps;
    const i = Number($("step-slider").value);
    const st = steps[i];
    const attr = s.result.attribute;
    let text = `step ${i + 1} of ${steps.length}: alpha ${fmt(st.alpha)}`;
    if (attr) text += `; ${attr}: predicted ${fmt(st.predicted)}, measured ${fmt(st.measured)}`;
    $("step-out").textContent = text;
    $("step-slider").setAttribute("aria-valuetext", text);
    [...$("steps-table").querySelectorAll("tbody tr")].forEach((tr, k) => tr.classList.toggle("current", k === i));
    const title = `Traverse ${s.result.direction}: ${text} (${st.file})`;
    requestVolume(s.job_id, st.file, title, true, modelByName(s.model));
  }

  // ----------------------------------------------------------------------------- encode
  // Three viewers side by side, all in the upload's space: the upload, the reconstruction, and
  // their difference; a click or drag in one moves the crosshair of all three.
  async function encodeViewers() {
    if (state.encodeViewers) return state.encodeViewers;
    const viewers = [];
    for (const id of ["encode-input-canvas", "encode-recon-canvas", "encode-diff-canvas"]) {
      const nv = newViewer();
      await nv.attachToCanvas($(id));
      nv.setSliceType(NV.SLICE_TYPE.MULTIPLANAR);
      nv.setRadiologicalConvention($("radiological").checked);
      viewers.push(nv);
    }
    for (const nv of viewers) nv.broadcastTo(viewers.filter((o) => o !== nv), { "2d": true, "3d": true });
    state.encodeViewers = viewers;
    return viewers;
  }

  // The upload's intensities in the model's units, as the model's preprocessing maps them
  // (model/data/preprocess.py: window): CT clipped to the model's window in HU; MRI divided by the
  // 99.9th percentile of its positive voxels, clipped to [0, 1], onto the model's range.
  function toModelUnits(vol, model) {
    const it = (model && model.intensity) || { lo: -1024, hi: 600 };
    const slope = Number.isFinite(vol.hdr.scl_slope) && vol.hdr.scl_slope !== 0 ? vol.hdr.scl_slope : 1;
    const inter = Number.isFinite(vol.hdr.scl_inter) ? vol.hdr.scl_inter : 0;
    const n = vol.hdr.dims[1] * vol.hdr.dims[2] * vol.hdr.dims[3];
    const out = new Float32Array(n);
    for (let q = 0; q < n; q++) out[q] = vol.img[q] * slope + inter;
    if (isCT(model)) {
      for (let q = 0; q < n; q++) out[q] = Math.min(it.hi, Math.max(it.lo, Number.isFinite(out[q]) ? out[q] : it.lo));
      return out;
    }
    const pos = [];
    const stride = Math.max(1, Math.floor(n / (1 << 22)) + 1);
    for (let q = 0; q < n; q += stride) if (out[q] > 0) pos.push(out[q]);
    if (pos.length === 0) throw new Error("the upload has no positive voxel");
    const sorted = Float64Array.from(pos).sort();
    // numpy's default (linear) percentile
    const r = 0.999 * (sorted.length - 1);
    const f = Math.floor(r);
    const top = sorted[f] + (sorted[Math.min(f + 1, sorted.length - 1)] - sorted[f]) * (r - f);
    for (let q = 0; q < n; q++) {
      const v = Number.isFinite(out[q]) ? Math.min(1, Math.max(0, out[q] / top)) : 0;
      out[q] = it.lo + v * (it.hi - it.lo);
    }
    return out;
  }

  // reconstruction - upload on the reconstruction's grid (the upload's own voxels in RAS order),
  // voxel by voxel in RAS index space, whatever order the upload file stores them in.
  function differenceVolume(input, recon, model) {
    const dims = recon.dimsRAS.slice(1, 4);
    const same = input.dimsRAS.slice(1, 4).every((d, k) => d === dims[k]);
    const close = (a, b) => a.every((x, k) => Math.abs(x - b[k]) <= 1e-3 * Math.max(1, Math.abs(x)));
    if (!same || !close(Array.from(input.matRAS), Array.from(recon.matRAS))) {
      throw new Error("the reconstruction is not on the upload's grid");
    }
    const a = toModelUnits(input, model);
    const rs = Number.isFinite(recon.hdr.scl_slope) && recon.hdr.scl_slope !== 0 ? recon.hdr.scl_slope : 1;
    const ri = Number.isFinite(recon.hdr.scl_inter) ? recon.hdr.scl_inter : 0;
    const [sa, sb] = [input.img2RASstep, recon.img2RASstep];
    const oa = input.img2RASstart[0] + input.img2RASstart[1] + input.img2RASstart[2];
    const ob = recon.img2RASstart[0] + recon.img2RASstart[1] + recon.img2RASstart[2];
    const diff = new Float32Array(dims[0] * dims[1] * dims[2]);
    let sumAbs = 0;
    for (let z = 0; z < dims[2]; z++) {
      for (let y = 0; y < dims[1]; y++) {
        let ia = oa + y * sa[1] + z * sa[2];
        let ib = ob + y * sb[1] + z * sb[2];
        for (let x = 0; x < dims[0]; x++, ia += sa[0], ib += sb[0]) {
          const d = recon.img[ib] * rs + ri - a[ia];
          diff[ib] = d;
          sumAbs += Math.abs(d);
        }
      }
    }
    const vol = recon.clone();
    vol.id = `${recon.id}-difference`;
    vol.name = "difference";
    vol.img = diff;
    vol.hdr.datatypeCode = 16; // NIfTI FLOAT32
    vol.hdr.numBitsPerVoxel = 32;
    vol.hdr.scl_slope = 1;
    vol.hdr.scl_inter = 0;
    vol.calMinMax();
    const span = Math.max(Math.abs(vol.global_min), Math.abs(vol.global_max), 1e-6);
    const it = (model && model.intensity) || { lo: -1, hi: 1 };
    const shown = Math.min(span, (it.hi - it.lo) / 2); // +-half the model's range, or less
    vol.cal_min = -shown;
    vol.cal_max = shown;
    vol.colormap = "gray";
    return { vol, meanAbs: sumAbs / diff.length, range: [vol.global_min, vol.global_max] };
  }

  async function onEncode(ev) {
    ev.preventDefault();
    const file = $("encode-file").files[0];
    if (!file) return;
    const model = state.model.name;
    const form = new FormData();
    form.append("model", model);
    form.append("file", file, file.name);
    form.append("reconstruct", $("encode-reconstruct").checked ? "true" : "false");
    const label = withLabel({}).label;
    if (label !== undefined) form.append("label", label);
    const series = $("encode-series").value.trim();
    if (series) form.append("series_uid", series);
    const steps = $("encode-steps").value.trim();
    if (steps) form.append("steps", steps);
    $("encode-result").hidden = true;
    const s = await runJob("encode", () => api("encode", { method: "POST", body: form }));
    if (!s) return;
    try {
      await showEncoded(s, file, model);
    } catch (e) {
      $("encode-status").classList.add("error");
      $("encode-status").textContent = `the job succeeded, but its result cannot be shown: ${e.message}`;
    }
  }

  async function showEncoded(s, file, model) {
    state.encode = { jobId: s.job_id, model };
    updateTraverseSources();
    const names = new Set(s.result.files.map((f) => f.name));
    $("encode-result").hidden = false;
    const [nvIn, nvRec, nvDiff] = await encodeViewers();
    const diffCaption = $("encode-diff-caption");
    const diffCanvas = $("encode-diff-canvas");
    delete diffCanvas.dataset.volume;
    delete diffCanvas.dataset.meanAbs;
    for (const nv of [nvIn, nvDiff]) while (nv.volumes.length) nv.removeVolume(nv.volumes[0]);
    delete $("encode-input-canvas").dataset.overlay;
    $("encode-overlay-field").hidden = true;
    diffCaption.textContent = "Difference: needs the upload in a format this viewer reads and a reconstruction";
    const inputCaption = $("encode-input-caption");
    inputCaption.textContent = `Your upload (${file.name}): this viewer cannot read it; see the model-grid view below`;
    if (VIEWABLE.test(file.name)) {
      try {
        await nvIn.loadFromArrayBuffer(await file.arrayBuffer(), file.name);
        inputCaption.textContent = `Your upload (${file.name}, as uploaded)`;
      } catch (e) {
        inputCaption.textContent += ` (${e.message})`;
      }
    }
    $("encode-input-canvas").dataset.volume = file.name;
    $("encode-input-png").closest("figure").hidden = !names.has("input.png");
    if (names.has("input.png")) $("encode-input-png").src = fileUrl(s.job_id, "input.png");
    const links = [];
    if (names.has("reconstruction.nii.gz")) {
      await nvRec.loadVolumes([
        { url: absolute(fileUrl(s.job_id, "reconstruction.nii.gz")), name: "reconstruction.nii.gz" },
      ]);
      $("encode-recon-canvas").dataset.volume = `${s.job_id}/reconstruction.nii.gz`;
      // on the upload's own grid (space "input"): the difference beside them, and optionally the
      // reconstruction overlaid on the upload, in world space
      if (s.result.space === "input" && nvIn.volumes.length === 1) {
        try {
          const d = differenceVolume(nvIn.volumes[0], nvRec.volumes[0], modelByName(model));
          nvDiff.addVolume(d.vol);
          nvDiff.drawScene();
          const units = unitsOf(model);
          diffCaption.textContent =
            `Difference: reconstruction − upload in the model's units (${units || "its units"}; the upload ` +
            `windowed as the model's preprocessing does), range ${fmt(d.range[0])} to ${fmt(d.range[1])}, ` +
            `mean |difference| ${fmt(d.meanAbs)}; grey = 0, white = reconstruction brighter`;
          diffCanvas.dataset.volume = `${s.job_id}/difference`;
          diffCanvas.dataset.meanAbs = String(d.meanAbs);
        } catch (e) {
          diffCaption.textContent = `Difference: not shown (${e.message})`;
        }
        try {
          await nvIn.addVolumeFromUrl({
            url: absolute(fileUrl(s.job_id, "reconstruction.nii.gz")),
            name: "reconstruction.nii.gz",
            colormap: "red",
            opacity: $("encode-overlay").checked ? 0.35 : 0,
          });
          $("encode-input-canvas").dataset.overlay = `${s.job_id}/reconstruction.nii.gz`;
          $("encode-overlay-field").hidden = false;
        } catch (e) {
          inputCaption.textContent += ` (overlay failed: ${e.message})`;
        }
      } else if (s.result.space !== "input") {
        diffCaption.textContent = "Difference: only for a reconstruction in the upload's space";
      }
      $("encode-recon-png").src = fileUrl(s.job_id, "reconstruction.png");
      links.push(["reconstruction.nii.gz", "Download the reconstruction (.nii.gz)"]);
    }
    $("encode-recon-canvas").closest("figure").hidden = !names.has("reconstruction.nii.gz");
    diffCanvas.closest("figure").hidden = !names.has("reconstruction.nii.gz");
    $("encode-recon-png").closest("figure").hidden = !names.has("reconstruction.png");
    links.push(["latent.npy", "Download the latent code (.npy)"]);
    $("encode-links").replaceChildren(
      ...links.flatMap(([name, text], i) => {
        const a = document.createElement("a");
        a.href = fileUrl(s.job_id, name);
        a.setAttribute("download", name);
        a.textContent = text;
        return i ? [document.createTextNode(" · "), a] : [a];
      }),
    );
  }

  // ----------------------------------------------------------------------------- wiring
  function init() {
    if (!NV || !NV.Niivue) {
      $("viewer-title").textContent = "The NiiVue bundle did not load; the viewer is unavailable.";
    }
    $("model-select").addEventListener("change", onModelChange);
    $("seed-random").addEventListener("click", () => {
      $("seed-input").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
    });
    $("generate-form").addEventListener("submit", onGenerate);
    $("traverse-form").addEventListener("submit", onTraverse);
    $("encode-form").addEventListener("submit", onEncode);
    $("step-slider").addEventListener("input", showStep);
    $("wl-preset").addEventListener("change", choosePreset);
    $("wl-window").addEventListener("input", onWindowInput);
    $("wl-level").addEventListener("input", onWindowInput);
    $("radiological").addEventListener("change", onConventionChange);
    $("encode-overlay").addEventListener("change", () => {
      const nvIn = state.encodeViewers && state.encodeViewers[0];
      if (nvIn && nvIn.volumes.length > 1) nvIn.setOpacity(1, $("encode-overlay").checked ? 0.35 : 0);
    });
    for (const r of document.querySelectorAll('input[name="view"]')) r.addEventListener("change", onViewChange);
    loadModels();
  }

  init();
})();

// voxgen's web page: plain JavaScript against the JSON API (no build step).  NiiVue (vendored UMD
// bundle, global `niivue`) draws the volumes.  All URLs are relative, so the page also works when
// the API is served under a path prefix.
"use strict";

(() => {
  const NV = window.niivue;
  const $ = (id) => document.getElementById(id);
  const POLL_MS = 400;
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
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const fmt = (x) => (typeof x === "number" ? (Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(4)) : "—");

  // Run one job: submit, then poll GET /jobs/{id} and show its progress until it ends.  The job box
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
        const s = await api(`jobs/${id}`);
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
        await sleep(POLL_MS);
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

  async function mainViewer() {
    if (state.nv) return state.nv;
    const nv = newViewer();
    await nv.attachToCanvas($("viewer"));
    nv.setSliceType(NV.SLICE_TYPE.MULTIPLANAR);
    nv.onIntensityChange = (vol) => {
      // NiiVue's own contrast drag: mirror it in the controls
      state.wl = { window: vol.cal_max - vol.cal_min, level: (vol.cal_max + vol.cal_min) / 2 };
      $("wl-preset").value = "custom";
      showWindowInputs();
    };
    state.nv = nv;
    return nv;
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

  function onViewChange(e) {
    if (!state.nv) return;
    const types = {
      multi: NV.SLICE_TYPE.MULTIPLANAR,
      axial: NV.SLICE_TYPE.AXIAL,
      coronal: NV.SLICE_TYPE.CORONAL,
      sagittal: NV.SLICE_TYPE.SAGITTAL,
      render: NV.SLICE_TYPE.RENDER,
    };
    state.nv.setSliceType(types[e.target.value]);
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
  async function encodeViewers() {
    if (state.encodeViewers) return state.encodeViewers;
    const viewers = [];
    for (const id of ["encode-input-canvas", "encode-recon-canvas"]) {
      const nv = newViewer();
      await nv.attachToCanvas($(id));
      nv.setSliceType(NV.SLICE_TYPE.MULTIPLANAR);
      nv.setRadiologicalConvention($("radiological").checked);
      viewers.push(nv);
    }
    state.encodeViewers = viewers;
    return viewers;
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
    const [nvIn, nvRec] = await encodeViewers();
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
      // on the upload's own grid (space "input"): overlay it on the upload, in world space
      if (s.result.space === "input" && nvIn.volumes.length === 1) {
        try {
          await nvIn.addVolumeFromUrl({
            url: absolute(fileUrl(s.job_id, "reconstruction.nii.gz")),
            name: "reconstruction.nii.gz",
            colormap: "red",
            opacity: 0.35,
          });
          $("encode-input-canvas").dataset.overlay = `${s.job_id}/reconstruction.nii.gz`;
          inputCaption.textContent += "; the reconstruction overlaid in red, in world space";
        } catch (e) {
          inputCaption.textContent += ` (overlay failed: ${e.message})`;
        }
      }
      $("encode-recon-png").src = fileUrl(s.job_id, "reconstruction.png");
      links.push(["reconstruction.nii.gz", "Download the reconstruction (.nii.gz)"]);
    }
    $("encode-recon-canvas").closest("figure").hidden = !names.has("reconstruction.nii.gz");
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
    for (const r of document.querySelectorAll('input[name="view"]')) r.addEventListener("change", onViewChange);
    loadModels();
  }

  init();
})();

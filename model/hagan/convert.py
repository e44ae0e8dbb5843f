"""Convert the authors' HA-GAN checkpoints (batmanlab/HA-GAN, ``{'model': state_dict, 'optimizer': ...}``
saved by ``torch.save``, keys possibly prefixed ``module.``) into a voxgen model directory.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
arbitrary pickled objects.  Every problem is reported with the file's name and what is wrong.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from model.base import Intensity
from model.hagan.config import HAGANConfig
from model.hagan.model import HAGANModel
from model.hagan.networks import HAGAN


class CheckpointError(ValueError):
    """An authors' checkpoint is missing, corrupt or does not fit the network."""


def load_authors_state(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Read one authors' .pth file -> its state dict with any ``module.`` prefix removed."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} checkpoint {p}: no such file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{what} checkpoint {p}: empty file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt zips / pickles / refused objects
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{what} checkpoint {p}: cannot be read as a PyTorch checkpoint of tensors "
            f"(corrupt, truncated, or it holds objects other than tensors): {msg}"
        ) from e
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(
            f"{what} checkpoint {p}: expected {{'model': state_dict, ...}} or a state dict of tensors, "
            f"found {type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, dict) else '-'}"
        )
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _numbered(sd: dict[str, torch.Tensor], scope: str, base: str) -> list[int]:
    """Sorted layer numbers of ``{scope}{base}N.weight`` keys (e.g. scope 'sub_D.', base 'conv')."""
    pat = re.compile(rf"^{re.escape(scope)}{base}(\d+)\.weight$")
    return sorted(int(m.group(1)) for k in sd if (m := pat.match(k)))


def _map_group(
    sd: dict[str, torch.Tensor], scope: str, base: str, targets: list[str], params: tuple[str, ...]
) -> dict[str, str]:
    """Authors' numbered layers, in order, onto our layer names."""
    nums = _numbered(sd, scope, base)
    if len(nums) != len(targets):
        raise CheckpointError(
            f"expected {len(targets)} layers '{scope}{base}N' but found {len(nums)} ({nums}); "
            "is this a checkpoint of the other resolution?"
        )
    out = {}
    for n, t in zip(nums, targets, strict=True):
        for prm in params:
            out[f"{scope}{base}{n}.{prm}"] = f"{t}.{prm}"
    return out


def key_map(net: HAGAN, which: str, sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """Authors' key -> our key, for one of the four checkpoint files ('G', 'D', 'E', 'Sub_E')."""
    conv, norm, sn = ("weight", "bias"), ("weight", "bias"), ("weight", "bias", "u0", "sv0")
    m: dict[str, str] = {}
    if which == "G":
        m.update({"fc1.weight": "ga.fc.weight", "fc1.bias": "ga.fc.bias"})
        ga_n, gh_n = len(net.ga.convs), len(net.gh.convs)
        tps = _numbered(sd, "", "tp_conv")
        if len(tps) != ga_n + gh_n:
            raise CheckpointError(f"expected {ga_n + gh_n} layers tp_convN, found {len(tps)}")
        for i, n in enumerate(tps):
            tgt = f"ga.convs.{i}" if i < ga_n else f"gh.convs.{i - ga_n}"
            m.update({f"tp_conv{n}.{p}": f"{tgt}.{p}" for p in conv})
        bns = _numbered(sd, "", "bn")
        for i, n in enumerate(bns):
            tgt = f"ga.norms.{i}" if i < ga_n else f"gh.norms.{i - ga_n}"
            m.update({f"bn{n}.{p}": f"{tgt}.{p}" for p in norm})
        m.update(_map_group(sd, "sub_G.", "tp_conv", [f"gl.convs.{i}" for i in range(len(net.gl.convs))], conv))
        m.update(_map_group(sd, "sub_G.", "bn", [f"gl.norms.{i}" for i in range(len(net.gl.norms))], norm))
    elif which == "D":
        m.update(_map_group(sd, "", "conv", [f"dh.convs.{i}" for i in range(len(net.dh.convs))], sn))
        m.update({f"fc1.{p}": f"dh.fc1.{p}" for p in sn})
        m.update({f"fc2.{p}": f"dh.fc2.{p}" for p in sn})
        if net.dh.fc_class is not None:
            m.update({f"fc2_class.{p}": f"dh.fc_class.{p}" for p in sn})
        targets = [f"dl.convs.{i}" for i in range(len(net.dl.convs))] + ["dl.out"]
        m.update(_map_group(sd, "sub_D.", "conv", targets, sn))
    elif which == "E":
        m.update(_map_group(sd, "", "conv", [f"eh.convs.{i}" for i in range(len(net.eh.convs))], conv))
        m.update(_map_group(sd, "", "bn", [f"eh.norms.{i}" for i in range(len(net.eh.norms))], norm))
    elif which == "Sub_E":
        m.update(_map_group(sd, "", "conv", [f"eg.convs.{i}" for i in range(len(net.eg.convs))] + ["eg.out"], conv))
        m.update(_map_group(sd, "", "bn", [f"eg.norms.{i}" for i in range(len(net.eg.norms))], norm))
    else:
        raise ValueError(which)
    return m


def _infer_config(g: dict, sub_e: dict, d: dict | None) -> tuple[int, int, int]:
    """(resolution, latent_dim, num_classes) from the tensors: 256 has E^G's conv1 and D^H's conv1."""
    if "fc1.weight" not in g:
        raise CheckpointError("G checkpoint has no fc1.weight: not an HA-GAN generator")
    conv_out = [k for k in sub_e if re.fullmatch(r"conv\d+\.weight", k)]
    if not conv_out:
        raise CheckpointError("Sub_E checkpoint has no convN.weight: not an HA-GAN E^G")
    last = max(conv_out, key=lambda k: int(k[4:-7]))
    latent = int(sub_e[last].shape[0])
    n_in = int(g["fc1.weight"].shape[1])
    if n_in < latent:
        raise CheckpointError(f"G's fc1 takes {n_in} inputs but Sub_E outputs {latent}: files from different models?")
    res = 256 if "conv1.weight" in sub_e else 128
    if d is not None and ("conv1.weight" in d) != (res == 256):
        raise CheckpointError("D and Sub_E checkpoints disagree on the resolution (128 vs 256)")
    return res, latent, n_in - latent


def import_authors_checkpoints(
    g: str | os.PathLike,
    e: str | os.PathLike,
    sub_e: str | os.PathLike,
    d: str | os.PathLike | None,
    modality: str,
    output: str | os.PathLike,
    resolution: int | None = None,
    latent_dim: int | None = None,
    class_names: list[str] | None = None,
) -> Path:
    """Convert G/E/Sub_E (and optionally D) .pth files into a model directory at ``output``."""
    files = {"G": g, "E": e, "Sub_E": sub_e} | ({"D": d} if d else {})
    sds = {k: load_authors_state(v, k) for k, v in files.items()}
    res, latent, n_cls = _infer_config(sds["G"], sds["Sub_E"], sds.get("D"))
    if resolution is not None and resolution != res:
        raise CheckpointError(f"--resolution {resolution} given, but the checkpoints are of a {res}^3 model")
    if latent_dim is not None and latent_dim != latent:
        raise CheckpointError(f"--latent-dim {latent_dim} given, but the checkpoints have latent size {latent}")
    names = list(class_names or [])
    if n_cls and not names:
        names = [f"class{i}" for i in range(n_cls)]
    if len(names) != n_cls:
        raise CheckpointError(f"the generator is conditioned on {n_cls} classes but {len(names)} names were given")
    cfg = HAGANConfig(
        resolution=res,
        latent_dim=latent,
        class_names=names,
        modality=modality,
        intensity=Intensity.for_modality(modality),
        description="converted from the authors' HA-GAN checkpoints",
    )
    model = HAGANModel.init(cfg, seed=0)
    ours = model.net.state_dict()
    loaded: set[str] = set()
    for which, sd in sds.items():
        try:
            mapping = key_map(model.net, which, sd)
        except CheckpointError as err:
            raise CheckpointError(f"{which} checkpoint {files[which]}: {err}") from None
        extra = sorted(set(sd) - set(mapping))
        if extra:
            raise CheckpointError(f"{which} checkpoint {files[which]}: unexpected keys {extra[:5]}")
        for src, dst in mapping.items():
            if src not in sd:
                raise CheckpointError(f"{which} checkpoint {files[which]}: missing key {src!r}")
            if tuple(sd[src].shape) != tuple(ours[dst].shape):
                raise CheckpointError(
                    f"{which} checkpoint {files[which]}: {src} has shape {list(sd[src].shape)}, "
                    f"expected {list(ours[dst].shape)} for a {res}^3 model with latent {latent}"
                )
            if not torch.isfinite(sd[src]).all():
                raise CheckpointError(f"{which} checkpoint {files[which]}: {src} contains NaN or infinite values")
            ours[dst] = sd[src].to(ours[dst].dtype)
            loaded.add(dst)
    model.net.load_state_dict(ours)
    model.save_pretrained(output)
    return Path(output)

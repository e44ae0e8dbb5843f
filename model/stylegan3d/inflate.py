"""2D -> 3D weight inflation (Liu et al. 2022, section III-B, eqs. 3-7).

The 2D network (``dims=2``) and the 3D network (``dims=3``) come from the same code, so their
state dicts have the same keys.  For every convolution weight ``w2 [Co, Ci, k, k]`` the 3D weight
``w3 [Co, Ci, k, k, k]`` is first drawn from N(0, 0.1) (std 0.1, on the stored equalised-lr
tensor, whose own initialisation is N(0, 1)), then set by the strategy (c = k // 2 the centre):

* ``inflate-1``:   w3[:, :, c] = w2
* ``inflate-2``:   w3[:, :, 0] = w3[:, :, 1] = w2
* ``inflate-3``:   w3[:, :, i] = w2 for every depth slice i
* ``inflate-asc``: w3[:, :, c, :, :] = w3[:, :, :, c, :] = w3[:, :, :, :, c] = w2 (axial, then
  coronal, then sagittal plane; the last write wins on the shared centre line)
* ``inflate-nwi``: w3[:, :, i] = a_i w2 with a_c = (2T-1)/T, a_i = -1/T otherwise, T = k = 3

1x1 convolutions (ToRGB, FromRGB, skips) have a single depth tap; every strategy copies them.
Everything else of an inflated network is copied: mapping, affines, biases, noise strengths,
``w_avg``.  Two tensors change shape between 2D and 3D and are mapped so that a volume constant
along depth gives the 2D result: the learned constant and the constant noise maps are repeated
along depth, and D's FC after the last block (input C x h x w in 2D, C x d x h x w in 3D) gets
``w2 / sqrt(d)`` on every depth position (the equalised-lr gain falls by sqrt(d) as well).
A part that is not inflated (``parts=("G",)`` leaves D) keeps its random 3D initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from model.stylegan3d.config import StyleGAN3DConfig
from model.stylegan3d.networks import StyleGAN3D

STRATEGIES = ("inflate-1", "inflate-2", "inflate-3", "inflate-asc", "inflate-nwi")
INIT_STD = 0.1


def inflate_weight(w2: torch.Tensor, strategy: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """One conv weight [Co, Ci, k, k] -> [Co, Ci, k, k, k] by ``strategy`` (see the module doc)."""
    if w2.ndim != 4 or w2.shape[2] != w2.shape[3]:
        raise ValueError(f"expected a square 2D conv weight [Co, Ci, k, k], got {list(w2.shape)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown inflation strategy {strategy!r}; use one of {STRATEGIES}")
    co, ci, k, _ = w2.shape
    w2 = w2.detach().float().cpu()
    w3 = torch.randn(co, ci, k, k, k, generator=generator) * INIT_STD
    c = k // 2
    if k == 1:
        w3[:, :, 0] = w2
    elif strategy == "inflate-1":
        w3[:, :, c] = w2
    elif strategy == "inflate-2":
        w3[:, :, 0] = w2
        w3[:, :, 1] = w2
    elif strategy == "inflate-3":
        w3[:] = w2.unsqueeze(2)
    elif strategy == "inflate-asc":
        w3[:, :, c, :, :] = w2
        w3[:, :, :, c, :] = w2
        w3[:, :, :, :, c] = w2
    else:  # inflate-nwi
        t = k
        for i in range(k):
            w3[:, :, i] = w2 * ((2 * t - 1) / t if i == c else -1.0 / t)
    return w3


def _is_conv_weight(name: str, t2: torch.Tensor, t3: torch.Tensor) -> bool:
    return name.endswith("weight") and t2.ndim == 4 and t3.ndim == 5


def inflate_state_dict(
    sd2: dict[str, torch.Tensor],
    net3: StyleGAN3D,
    strategy: str = "inflate-1",
    parts: Iterable[str] = ("G", "D"),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A full 3D state dict: ``net3``'s own tensors, with the parts in ``parts`` inflated from ``sd2``."""
    parts = tuple(parts)
    if not parts or any(p not in ("G", "D") for p in parts):
        raise ValueError(f"parts must be a non-empty subset of ('G', 'D'), got {parts}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown inflation strategy {strategy!r}; use one of {STRATEGIES}")
    g = torch.Generator().manual_seed(seed)
    sd3 = {k: v.detach().clone() for k, v in net3.state_dict().items()}
    missing = [k for k in sd3 if k.split(".")[0] in parts and k not in sd2]
    if missing:
        raise ValueError(
            f"the 2D network does not match the 3D one (missing {missing[:3]}); same variant and channels?"
        )
    depth = net3.config.const_shape[0]
    for name, t3 in sd3.items():
        if name.split(".")[0] not in parts:
            continue
        t2 = sd2[name].detach().float().cpu()
        if _is_conv_weight(name, t2, t3):
            new = inflate_weight(t2, strategy, g)
        elif t2.shape == t3.shape:
            new = t2.clone()
        elif name.endswith("const") or name.endswith("noise_const"):  # [.., h, w] -> [.., d, h, w]
            reps = t3.shape[-3]
            new = t2.unsqueeze(-3).expand(*t2.shape[:-2], reps, *t2.shape[-2:]).clone()
        elif name == "D.fc.weight":
            co, c = t3.shape[0], net3.config.channels
            h, w = net3.config.const_shape[1:]
            new = (t2.reshape(co, c, 1, h, w) / math.sqrt(depth)).expand(co, c, depth, h, w).reshape(co, -1).clone()
        else:
            raise ValueError(f"cannot inflate {name}: 2D {list(t2.shape)} vs 3D {list(t3.shape)}")
        if new.shape != t3.shape:
            raise ValueError(f"cannot inflate {name}: got {list(new.shape)}, need {list(t3.shape)}")
        sd3[name] = new.to(t3.dtype)
    return sd3


def inflate_network(
    net2: StyleGAN3D,
    strategy: str = "inflate-1",
    parts: Iterable[str] = ("G", "D"),
    seed: int = 0,
    config3: StyleGAN3DConfig | None = None,
) -> StyleGAN3D:
    """A new 3D network (config = the 2D one with ``dims=3`` unless given) inflated from ``net2``."""
    if net2.config.dims != 2:
        raise ValueError(f"inflation takes a 2D network (dims=2), got dims={net2.config.dims}")
    cfg3 = config3 or net2.config.with_dims(3)
    if cfg3.dims != 3:
        raise ValueError("the target config must have dims=3")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net3 = StyleGAN3D(cfg3)
    net3.load_state_dict(inflate_state_dict(net2.state_dict(), net3, strategy, parts, seed))
    return net3

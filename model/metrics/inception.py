"""2D features from InceptionV3 with weights the user supplies (nothing is downloaded): the
network behind FID, applied to the middle slices for the slice-wise FID-ax/-cor/-sag/-avg that
Split&Shuffle reports.

The network is InceptionV3 (Szegedy et al. 2016) in the layout of torchvision's ``Inception3``:
a stem of 3x3 convolutions and two 3x3 stride-2 max-pools (299^2 -> 35^2), three Inception-A
blocks (Mixed_5b-d), a grid reduction (Mixed_6a), four Inception-C blocks with factorised 7x7
convolutions (Mixed_6b-e), a second reduction (Mixed_7a) and two Inception-E blocks (Mixed_7b-c);
every convolution is bias-free and followed by BatchNorm (eps 0.001) and ReLU.  Features are the
2048-d global average of Mixed_7c ("pool3"); the classifier (``fc``) and the auxiliary head
(``AuxLogits``) are not used.

Two sets of weights are accepted, told apart by their classifier:

* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (``fc`` with 1008 classes): TensorFlow's
  2015-12-05 Inception graph ported to PyTorch, the network of the original FID code.  That graph
  differs from torchvision's in its pooling branches, reproduced here: the 3x3 average pools of
  the A, C and first E block exclude the zero padding from the average, and the last E block
  (Mixed_7c) max-pools in its pool branch.  With these weights the figures are FIDs in the usual
  sense (up to the slices being float images rather than 8-bit files).
* torchvision's ``inception_v3`` ImageNet weights (``fc`` with 1000 classes, ``AuxLogits.*``):
  run with torchvision's own pooling (zero padding counted in every average pool).  Frechet
  distances on these features are FID-like but not comparable with published FIDs.

A file without ``fc``/``AuxLogits`` keys is taken as the pytorch-fid network.  Weights are read
from a ``.safetensors`` file, or from a PyTorch checkpoint with ``torch.load(weights_only=True)``
(a plain state dict, optionally under ``"state_dict"``), so a checkpoint carrying pickled code is
refused rather than run.

Input, as pytorch-fid prepares images for FID: slices in model space ([-1, 1], the range the
network expects) are resized bilinearly to 299 x 299 (``align_corners=False``, no antialiasing)
and the grey slice is replicated into the three colour channels.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.checkpoint import read_user_state_dict

FEATURES = 2048
INPUT_SIZE = 299
FID_CLASSES = 1008  # pytorch-fid / TF 2015-12-05 graph
TORCHVISION_CLASSES = 1000


class BasicConv2d(nn.Module):
    """Bias-free convolution, BatchNorm (eps 0.001), ReLU; state-dict keys ``conv.*`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], **kw: int | tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool3(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The 3x3 stride-1 pool of a pool branch: 'avg' (TF: padding not counted), 'avg_pad'
    (torchvision: padding counted) or 'max'."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=kind == "avg_pad")


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 (64 + 64 + 96 + pool_features)."""

    def __init__(self, cin: int, pool_features: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_pool3(x, self.pool))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max-pool 3x3/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1), 4 x 192 channels out."""

    def __init__(self, cin: int, c7: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for i in range(1, 6):
            c = getattr(self, f"branch7x7dbl_{i}")(c)
        d = self.branch_pool(_pool3(x, self.pool))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool 3x3/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded 1x3 / 3x1 outputs: 320 + 2 x 384 + 2 x 384 + 192 = 2048 channels."""

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        d = self.branch_pool(_pool3(x, self.pool))
        return torch.cat([a, b, c, d], 1)


class InceptionV3Features(nn.Module):
    """InceptionV3 up to pool3: [N, 3, H, W] in [-1, 1] -> [N, 2048].

    ``tf_pooling=True`` is the FID network (TF 2015-12-05 graph, pytorch-fid's weights);
    ``False`` is torchvision's pooling (its ImageNet weights).  Parameter names and shapes are
    those of torchvision's ``Inception3`` without ``fc`` and ``AuxLogits``.
    """

    def __init__(self, tf_pooling: bool = True) -> None:
        super().__init__()
        self.tf_pooling = tf_pooling
        avg = "avg" if tf_pooling else "avg_pad"
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, avg)
        self.Mixed_5c = InceptionA(256, 64, avg)
        self.Mixed_5d = InceptionA(288, 64, avg)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, avg)
        self.Mixed_6c = InceptionC(768, 160, avg)
        self.Mixed_6d = InceptionC(768, 160, avg)
        self.Mixed_6e = InceptionC(768, 192, avg)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, avg)
        self.Mixed_7c = InceptionE(2048, "max" if tf_pooling else "avg_pad")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def read_inception_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An InceptionV3 state dict from .safetensors or a weights-only torch checkpoint, 'module.' removed."""
    return read_user_state_dict(path)


def weights_kind(sd: dict[str, torch.Tensor]) -> str:
    """'pytorch-fid' (fc with 1008 classes, or no classifier) or 'torchvision' (1000 classes / AuxLogits)."""
    fc = sd.get("fc.weight")
    if fc is not None and (fc.ndim != 2 or fc.shape[1] != FEATURES):
        raise ValueError(f"'fc.weight' has shape {list(fc.shape)}; InceptionV3's classifier reads {FEATURES} features")
    if any(k.startswith("AuxLogits.") for k in sd) or (fc is not None and fc.shape[0] == TORCHVISION_CLASSES):
        return "torchvision"
    return "pytorch-fid"


def build_inception(sd: dict[str, torch.Tensor]) -> tuple[InceptionV3Features, str]:
    """The network these weights belong to, loaded strictly (every parameter and BatchNorm
    statistic present with its shape; only ``fc.*``, ``AuxLogits.*`` and ``num_batches_tracked``
    may be extra or missing), in eval mode; and which weights they are."""
    kind = weights_kind(sd)
    net = InceptionV3Features(tf_pooling=kind == "pytorch-fid")
    want = net.state_dict()
    for k, v in want.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k not in sd:
            raise ValueError(f"not InceptionV3 weights: key {k!r} is missing")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"not InceptionV3 weights: {k!r} has shape {list(sd[k].shape)}, expected {list(v.shape)}")
    extra = [k for k in sd if k not in want and not k.startswith(("fc.", "AuxLogits."))]
    if extra:
        raise ValueError(f"not InceptionV3 weights: unexpected keys {extra[:3]}")
    net.load_state_dict({k: sd[k] for k in want if k in sd}, strict=False)
    return net.eval(), kind


class InceptionSlices:
    """2048-d InceptionV3 pool3 features of 2D slices, with user-supplied weights (see the module
    docstring); the same interface as ``PooledSlices``: [N, H, W] in [-1, 1] -> float32 [N, 2048]
    on the CPU, computed ``chunk`` slices at a time without gradients."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = None, chunk: int = 16) -> None:
        from model.registry import resolve_device

        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        net, self.kind = build_inception(read_inception_weights(path))
        self.device = resolve_device(str(device) if device else None)
        self.net = net.requires_grad_(False).to(self.device)
        self.chunk = chunk
        self.name = "slice-inception"
        which = (
            "pytorch-fid's port of TF's 2015-12-05 Inception graph (the FID network)"
            if self.kind == "pytorch-fid"
            else "torchvision's ImageNet network (FID-like, not comparable with published FIDs)"
        )
        self.description = (
            f"InceptionV3 pool3 features ({FEATURES}-d) of the middle slice with weights from {path}, {which}; "
            f"slice in [-1, 1] resized bilinearly to {INPUT_SIZE}x{INPUT_SIZE} and replicated to 3 channels, "
            "so the slice-wise Frechet distances are FIDs (FID-ax/-cor/-sag/-avg)"
        )

    @torch.no_grad()
    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        if s.ndim != 3:
            raise ValueError(f"expected slices [N, H, W], got shape {list(s.shape)}")
        out = [torch.zeros(0, FEATURES)]
        for i in range(0, s.shape[0], self.chunk):
            x = s[i : i + self.chunk, None].float().to(self.device)
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            out.append(self.net(x.expand(-1, 3, -1, -1)).float().cpu())
        return torch.cat(out)

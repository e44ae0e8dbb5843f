"""3D features from a MedicalNet / Med3D ResNet (Chen, Ma & Zheng 2019) with weights the user
supplies (nothing is downloaded): the extractor the HA-GAN paper uses for its FID and MMD.

The network is the Med3D encoder: a 7^3 stride-2 stem (64 channels, BatchNorm, ReLU, 3^3 stride-2
max-pool), then four residual stages of 64, 128 (stride 2), 256 (dilation 2) and 512 (dilation 4)
planes, with basic blocks (ResNet-10/18/34) or bottleneck blocks (ResNet-50 and deeper).  The
depth, the block type and the shortcut type (A: parameter-free, B: 1^3 convolution + BatchNorm)
are read from the weights themselves; the segmentation head (``conv_seg``) is ignored.  Features
are the global average of the last stage (512 or 2048 numbers).

Weights: a ``.safetensors`` file, or a PyTorch checkpoint read with ``torch.load(weights_only=True)``
(a plain state dict, or MedicalNet's ``{"state_dict": {"module.conv1.weight": ...}}``).  Each
volume is standardised (zero mean, unit variance over the volume) before the network, as Med3D's
inputs were.
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.checkpoint import read_user_state_dict
from model.data.grid import resample


def _conv3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ShortcutA(nn.Module):
    """Parameter-free shortcut: strided subsampling, zero channels appended."""

    def __init__(self, cout: int, stride: int) -> None:
        super().__init__()
        self.cout, self.stride = cout, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        return F.pad(y, (0, 0, 0, 0, 0, 0, 0, self.cout - y.shape[1]))


class Med3DResNet(nn.Module):
    """The Med3D encoder; ``forward`` returns the globally averaged last-stage features."""

    def __init__(self, layers: list[int], bottleneck: bool, shortcut: str = "B") -> None:
        super().__init__()
        block = Bottleneck if bottleneck else BasicBlock
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        cin = 64
        stages = []
        for planes, n, stride, dil in zip((64, 128, 256, 512), layers, (1, 2, 1, 1), (1, 1, 2, 4), strict=True):
            blocks = []
            for i in range(n):
                down = None
                cout = planes * block.expansion
                if i == 0 and (stride != 1 or cin != cout):
                    down = (
                        ShortcutA(cout, stride)
                        if shortcut == "A"
                        else nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))
                    )
                blocks.append(block(cin, planes, stride if i == 0 else 1, dil, down))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4))


def read_medicalnet_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A MedicalNet state dict from .safetensors or a weights-only torch checkpoint, 'module.' removed
    and the segmentation head (``conv_seg``) dropped."""
    return {k: v for k, v in read_user_state_dict(path).items() if not k.startswith("conv_seg")}


def build_from_state_dict(sd: dict[str, torch.Tensor]) -> Med3DResNet:
    """The Med3D network these weights belong to (depth, block and shortcut type from the keys)."""
    layers = []
    for s in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{s}\.(\d+)\.", k))}
        if not idx:
            raise ValueError(f"not Med3D ResNet weights: no layer{s}.* keys")
        layers.append(max(idx) + 1)
    bottleneck = "layer1.0.conv3.weight" in sd
    shortcut = "B" if "layer2.0.downsample.0.weight" in sd else "A"
    net = Med3DResNet(layers, bottleneck, shortcut)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"weights do not match a Med3D ResNet{layers}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return net.eval()


class MedicalNetFeatures:
    """3D features from user-supplied Med3D weights (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = None, grid: int | None = None):
        from model.registry import resolve_device

        self.net = build_from_state_dict(read_medicalnet_weights(path)).requires_grad_(False)
        self.device = resolve_device(str(device) if device else None)
        self.net.to(self.device)
        self.grid = grid
        depth = sum(len(getattr(self.net, f"layer{i}")) for i in range(1, 5))
        self.name = "medicalnet"
        self.description = (
            f"Med3D ResNet ({depth} residual blocks, {self.net.out_features}-d global-average features) "
            f"with weights from {path}; each volume standardised to zero mean, unit variance"
        )

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.grid:
            x = resample(x, (self.grid,) * 3)
        flat = x.flatten(1)
        x = (x - flat.mean(1).view(-1, 1, 1, 1, 1)) / flat.std(1).clamp_min(1e-6).view(-1, 1, 1, 1, 1)
        return self.net(x.to(self.device)).float().cpu()

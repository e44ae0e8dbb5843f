"""3D alpha-WGAN-GP networks at 64^3 (Kwon et al., MICCAI 2019, Fig. 1 and section 2).

* Discriminator D and encoder E: five 3D convolutions with 4x4x4 kernels.  The first four have
  stride 2 and padding 1 (64 -> 32 -> 16 -> 8 -> 4 voxels; 64, 128, 256, 512 channels at width 1);
  the fifth has stride 1, no padding and maps the 4^3 map to one value (D) or to the latent code
  (E).  BatchNorm + LeakyReLU(0.2) after each layer, no BatchNorm after the first and none after
  the last (which also has no activation).
* Generator G: the latent [n, 1000] goes through a linear layer to a 512 x 4^3 map (a 4x4x4
  transposed convolution of a 1x1x1 input, written as the linear map it is), BatchNorm + ReLU,
  then four resize-convolutions: nearest x2 upsampling followed by a 3x3x3 convolution (512 ->
  256 -> 128 -> 64 -> 1), BatchNorm + ReLU after each but the last, which ends in tanh.  G's
  layers have no bias (each is followed by BatchNorm; the last, as in the authors' code, neither).
* Code discriminator C: three fully connected layers (latent -> h -> h -> 1) with BatchNorm +
  LeakyReLU(0.2) between them.  The paper does not give h; the authors' training notebook uses
  4096, the default here (``code_hidden``).

``width`` scales every channel count (tests use a small one); ``latent_dim`` and the code
discriminator's width are free.  Inputs and outputs are in model space ([-1, 1]).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.alphawgan.config import AlphaWGANConfig


def _conv_stack(c: list[int], out_features: int) -> nn.ModuleDict:
    convs = nn.ModuleList()
    norms = nn.ModuleList()
    cin = 1
    for i, co in enumerate(c):
        convs.append(nn.Conv3d(cin, co, 4, stride=2, padding=1))
        norms.append(nn.Identity() if i == 0 else nn.BatchNorm3d(co))
        cin = co
    convs.append(nn.Conv3d(cin, out_features, 4, stride=1, padding=0))
    return nn.ModuleDict({"convs": convs, "norms": norms})


class _ConvNet(nn.Module):
    """Shared body of D and E: [n, 1, 64, 64, 64] -> [n, out_features]."""

    def __init__(self, cfg: AlphaWGANConfig, out_features: int) -> None:
        super().__init__()
        s = _conv_stack(cfg.channels, out_features)
        self.convs, self.norms = s["convs"], s["norms"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs[:-1], self.norms, strict=True):
            x = F.leaky_relu(norm(conv(x)), 0.2)
        return self.convs[-1](x).flatten(1)


class Discriminator(_ConvNet):
    """The critic D: a volume -> one unbounded score (WGAN)."""

    def __init__(self, cfg: AlphaWGANConfig) -> None:
        super().__init__(cfg, 1)


class Encoder(_ConvNet):
    """E: a volume -> its latent code [n, latent_dim]."""

    def __init__(self, cfg: AlphaWGANConfig) -> None:
        super().__init__(cfg, cfg.latent_dim)


class Generator(nn.Module):
    """G: latent [n, latent_dim] -> volume [n, 1, 64, 64, 64] in [-1, 1]."""

    def __init__(self, cfg: AlphaWGANConfig) -> None:
        super().__init__()
        c = cfg.channels[::-1]  # 512, 256, 128, 64 at width 1
        self.c0 = c[0]
        self.fc = nn.Linear(cfg.latent_dim, c[0] * 4**3, bias=False)
        self.norm0 = nn.BatchNorm3d(c[0])
        outs = [*c[1:], 1]
        self.convs = nn.ModuleList(nn.Conv3d(ci, co, 3, padding=1, bias=False) for ci, co in zip(c, outs, strict=True))
        self.norms = nn.ModuleList(nn.BatchNorm3d(co) for co in outs[:-1])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm0(self.fc(z).view(z.shape[0], self.c0, 4, 4, 4)))
        for i, conv in enumerate(self.convs):
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"))
            h = F.relu(self.norms[i](h)) if i < len(self.norms) else torch.tanh(h)
        return h


class CodeDiscriminator(nn.Module):
    """C: a latent code -> one unbounded score (real = drawn from N(0, I), fake = E(x))."""

    def __init__(self, cfg: AlphaWGANConfig) -> None:
        super().__init__()
        h = cfg.code_hidden
        self.fc1 = nn.Linear(cfg.latent_dim, h)
        self.norm1 = nn.BatchNorm1d(h)
        self.fc2 = nn.Linear(h, h)
        self.norm2 = nn.BatchNorm1d(h)
        self.fc3 = nn.Linear(h, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.norm1(self.fc1(z)), 0.2)
        h = F.leaky_relu(self.norm2(self.fc2(h)), 0.2)
        return self.fc3(h)


class AlphaWGAN(nn.Module):
    """The four networks of one model; the state dict keys are ``g.*``, ``e.*``, ``d.*``, ``c.*``."""

    def __init__(self, cfg: AlphaWGANConfig) -> None:
        super().__init__()
        self.config = cfg
        self.g = Generator(cfg)
        self.e = Encoder(cfg)
        self.d = Discriminator(cfg)
        self.c = CodeDiscriminator(cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(net: AlphaWGAN) -> dict[str, int]:
    out = {k: count_parameters(getattr(net, k)) for k in ("g", "e", "d", "c")}
    out["total_parameters"] = sum(out.values())
    return out

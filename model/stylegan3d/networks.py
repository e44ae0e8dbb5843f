"""Mapping, synthesis, generator and residual discriminator of 3D-StyleGAN / 3D Split&Shuffle-GAN.

The same code builds the 2D network (``dims=2``, axial slices) and the 3D one (``dims=3``), so the
2D weights inflate into the 3D network tensor by tensor (see ``inflate.py``).

* Mapping: normalised z -> ``mapping_layers`` equalised-lr FC layers (width ``mapping_width``,
  lr multiplier 0.01) -> w; tracks ``w_avg`` for truncation; w is broadcast to ``num_ws`` layers.
* Synthesis: a learned constant (in-plane 4x4; 2x4x4 for 32x64x64, 4x4x4 for 64^3), then
  ``num_blocks`` blocks; the first has one conv, the others an upsampling conv and a conv; each
  block adds its ToRGB output to the upsampled running image (skip architecture).  ws index:
  block 0 uses ws[0] (conv) and ws[1] (ToRGB); block k >= 1 uses ws[2k-1], ws[2k], ws[2k+1].
* Discriminator (residual): FromRGB 1x1, then per block conv, conv + 2x down, and a 1x1 skip
  (both paths scaled by sqrt(1/2)); epilogue: minibatch std, conv, FC, FC -> one logit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model import distributed
from model.stylegan3d.config import StyleGAN3DConfig
from model.stylegan3d.layers import (
    EqualConv,
    EqualLinear,
    MinibatchStd,
    SplitSynthesisLayer,
    SynthesisLayer,
    ToRGB,
    d_conv,
    normalize_2nd_moment,
    prod,
    upsample2x,
)


class MappingNetwork(nn.Module):
    def __init__(self, cfg: StyleGAN3DConfig, w_avg_beta: float = 0.995) -> None:
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws = cfg.z_dim, cfg.w_dim, cfg.num_ws
        self.w_avg_beta = w_avg_beta
        feats = [cfg.z_dim] + [cfg.mapping_width] * (cfg.mapping_layers - 1) + [cfg.w_dim]
        self.layers = nn.ModuleList(
            [
                EqualLinear(a, b, lr_mult=cfg.mapping_lr_mult, act=True)
                for a, b in zip(feats[:-1], feats[1:], strict=True)
            ]
        )
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(
        self, z: torch.Tensor, truncation_psi: float = 1.0, *, update_w_avg: bool = False, broadcast: bool = True
    ) -> torch.Tensor:
        x = normalize_2nd_moment(z)
        for layer in self.layers:
            x = layer(x)
        if update_w_avg:
            with torch.no_grad():
                mean = distributed.mean_over_ranks(x.detach().mean(0))  # the global batch's (model/distributed.py)
                self.w_avg.copy_(mean.lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1.0:
            x = self.w_avg.lerp(x, truncation_psi)
        return x.unsqueeze(1).repeat(1, self.num_ws, 1) if broadcast else x


class SynthesisBlock(nn.Module):
    def __init__(self, cfg: StyleGAN3DConfig, res: tuple[int, ...], first: bool) -> None:
        super().__init__()
        c, dims = cfg.channels, cfg.dims
        self.first = first
        if first:
            self.const = nn.Parameter(torch.randn(c, *res))

        def layer(up: bool) -> nn.Module:
            if cfg.split_g:
                return SplitSynthesisLayer(c, c, cfg.w_dim, res, up=up, shuffle=cfg.shuffle_g)
            return SynthesisLayer(c, c, cfg.w_dim, res, up=up)

        if not first:
            self.conv0 = layer(up=True)
        self.conv1 = layer(up=False)
        self.torgb = ToRGB(c, cfg.w_dim, dims)
        self.num_ws = 2 if first else 3

    def forward(
        self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, noise_mode: str = "random"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:
            x = self.const.unsqueeze(0).repeat(ws.shape[0], *([1] * self.const.ndim))
            x = self.conv1(x, ws[:, 0], noise_mode)
        else:
            assert x is not None
            x = self.conv0(x, ws[:, 0], noise_mode)
            x = self.conv1(x, ws[:, 1], noise_mode)
        y = self.torgb(x, ws[:, -1])
        img = y if img is None else upsample2x(img) + y
        return x, img


class SynthesisNetwork(nn.Module):
    def __init__(self, cfg: StyleGAN3DConfig) -> None:
        super().__init__()
        self.num_ws = cfg.num_ws
        base = cfg.const_shape
        self.blocks = nn.ModuleList(
            [SynthesisBlock(cfg, tuple(s * 2**i for s in base), first=i == 0) for i in range(cfg.num_blocks)]
        )

    @staticmethod
    def block_ws_start(k: int) -> int:
        """Index in ws of the first style that block ``k`` uses."""
        return 0 if k == 0 else 2 * k - 1

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        x = img = None
        for k, block in enumerate(self.blocks):
            s = self.block_ws_start(k)
            x, img = block(x, img, ws[:, s : s + block.num_ws], noise_mode)
        assert img is not None
        return img


class Generator(nn.Module):
    def __init__(self, cfg: StyleGAN3DConfig) -> None:
        super().__init__()
        self.mapping = MappingNetwork(cfg)
        self.synthesis = SynthesisNetwork(cfg)

    def forward(
        self, z: torch.Tensor, truncation_psi: float = 1.0, noise_mode: str = "random", update_w_avg: bool = False
    ) -> torch.Tensor:
        return self.synthesis(self.mapping(z, truncation_psi, update_w_avg=update_w_avg), noise_mode)


class DiscriminatorBlock(nn.Module):
    def __init__(self, cfg: StyleGAN3DConfig, first: bool) -> None:
        super().__init__()
        c, dims = cfg.channels, cfg.dims
        self.fromrgb = EqualConv(1, c, 1, dims=dims) if first else None
        g = math.sqrt(0.5)
        self.conv0 = d_conv(cfg.d_variant, c, c, dims=dims, groups=cfg.d_groups)
        self.conv1 = d_conv(cfg.d_variant, c, c, dims=dims, groups=cfg.d_groups, down=True, gain=g)
        self.skip = EqualConv(c, c, 1, dims=dims, bias=False, act=False, down=True, gain=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fromrgb is not None:
            x = self.fromrgb(x)
        return self.skip(x) + self.conv1(self.conv0(x))


class Discriminator(nn.Module):
    def __init__(self, cfg: StyleGAN3DConfig) -> None:
        super().__init__()
        c, dims = cfg.channels, cfg.dims
        self.blocks = nn.ModuleList([DiscriminatorBlock(cfg, first=i == 0) for i in range(cfg.num_blocks - 1)])
        self.mbstd = MinibatchStd(cfg.mbstd_group)
        self.conv = d_conv(cfg.d_variant, c + 1, c, dims=dims, groups=cfg.d_groups)
        self.fc = EqualLinear(c * prod(cfg.const_shape), c, act=True)
        self.out = EqualLinear(c, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = img
        for block in self.blocks:
            x = block(x)
        x = self.conv(self.mbstd(x))
        return self.out(self.fc(x.flatten(1)))


class StyleGAN3D(nn.Module):
    """G (mapping + synthesis) and D of one model; ``config`` describes it fully."""

    def __init__(self, cfg: StyleGAN3DConfig) -> None:
        super().__init__()
        self.config = cfg
        self.G = Generator(cfg)
        self.D = Discriminator(cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(net: StyleGAN3D) -> dict[str, int]:
    """Mapping, synthesis, G (= both), D and ``total_parameters`` = G + D (the paper's #param)."""
    out = {
        "mapping": count_parameters(net.G.mapping),
        "synthesis": count_parameters(net.G.synthesis),
        "G": count_parameters(net.G),
        "D": count_parameters(net.D),
    }
    out["total_parameters"] = count_parameters(net)
    return out

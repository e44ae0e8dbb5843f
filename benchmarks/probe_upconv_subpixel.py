"""Forward + backward of HA-GAN's fused upsample-conv (``up_conv``: nearest x2 upsample then a 3x3x3 conv,
computed as one stride-2 transposed conv) against a sub-pixel form of the same function: one ordinary
2x2x2 conv with 8x the output channels on the input padded by one, then the eight output parities
interleaved.  Both do the same multiply-adds; the question is which kernel the CPU runs faster in
training, where the transposed convs' backward is the largest part of an iteration (a GLO iteration of
the demo model, torch profiler: convolution backward 58 % of the time).

    python benchmarks/probe_upconv_subpixel.py [--repeats 3]

Prints, for the four upsample-convs of the demo model's G (width 0.5, 128^3, batch 2), the largest difference
relative to the output's largest value and the best time of each form.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from model.hagan.networks import upconv_weight

# transposed-conv taps per output parity on a k=2 window of the padded input: parity 0 takes the input
# voxels i-1, i (taps 3, 1); parity 1 takes i, i+1 (taps 2, 0)
_TAPS = torch.tensor([[3, 1], [2, 0]])


def subpixel_weight(w: torch.Tensor) -> torch.Tensor:
    """[Co, Ci, 3, 3, 3] upsample-conv weights -> [8 Co, Ci, 2, 2, 2], parity-major."""
    k = upconv_weight(w)  # [Ci, Co, 4, 4, 4]
    parts = [
        k[:, :, _TAPS[a]][:, :, :, _TAPS[b]][:, :, :, :, _TAPS[c]].transpose(0, 1)
        for a in range(2)
        for b in range(2)
        for c in range(2)
    ]
    return torch.cat(parts, 0)


def subpixel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    co = w.shape[0]
    y = F.conv3d(F.pad(x, (1,) * 6), subpixel_weight(w))  # [B, 8 Co, n + 1, n + 1, n + 1]
    bs, n1, n = y.shape[0], y.shape[2], y.shape[2] - 1
    y = y.view(bs, 2, 2, 2, co, n1, n1, n1)
    o = torch.stack(
        [
            torch.stack(
                [
                    torch.stack([y[:, a, p, c, :, a : a + n, p : p + n, c : c + n] for c in range(2)], -1)
                    for p in range(2)
                ],
                -3,
            )
            for a in range(2)
        ],
        -5,
    )  # [B, Co, n, 2, n, 2, n, 2]
    return o.reshape(bs, co, 2 * n, 2 * n, 2 * n) + b.view(1, -1, 1, 1, 1)


def transposed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.conv_transpose3d(x, upconv_weight(w), b, stride=2, padding=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    print("| Ci -> Co | input grid | max rel. difference | transposed conv | sub-pixel |")
    print("|---|---|---|---|---|")
    for ci, co, n in ((256, 128, 8), (128, 64, 16), (32, 16, 32), (16, 1, 64)):  # the demo G's
        x = torch.randn(2, ci, n, n, n, requires_grad=True)
        w = (torch.randn(co, ci, 3, 3, 3) * 0.05).requires_grad_()
        b = torch.randn(co).requires_grad_()
        with torch.no_grad():
            ref = transposed(x, w, b)
            err = float((ref - subpixel(x, w, b)).abs().max() / ref.abs().max())
        xx = x.detach().contiguous(memory_format=torch.channels_last_3d) if n >= 32 else x.detach()
        xx.requires_grad_(True)
        best = {}
        for name, fn in (("transposed", transposed), ("subpixel", subpixel)) * a.repeats:
            t = time.perf_counter()
            fn(xx, w, b).square().mean().backward()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        tt, ts = best["transposed"] * 1e3, best["subpixel"] * 1e3
        print(f"| {ci} -> {co} | {n}^3 | {err:.1e} | {tt:.0f} ms | {ts:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()

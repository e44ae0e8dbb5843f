"""Where fp32 encoding spends its time, and whether fewer multiplications in PyTorch ops pay.

Speed issue 17, item 4 asks for 256^3 encoding in at most 0.5x the authors' time.  This probe times
each convolution of E^H and E^G at the authors' full width (random weights, a random volume, as
``bench_generate.py`` uses) in the layout ``HAGANModel.encode`` gives it (channels-last where the grid
is large, two slabs per call), counts its multiply-adds and prints the rate: a layer already at the
core's rate can only get faster with fewer multiplications.  Then the largest layer (E^H's 3x3x3
convolution) is run as a Winograd F(m, 3) along the last axis (m = 2, 4: 1.5x and 2x fewer
multiplications), built from PyTorch operations (input transform, one convolution per Winograd
component with a 3x3x1 kernel, output transform), with its largest difference from the direct
convolution.

    python benchmarks/probe_encode_convs.py [--res 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Winograd F(m, 3) matrices (Lavin & Gray 2016): input transform B^T, filter transform G, output A^T
WINOGRAD = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


def winograd_w(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor:
    """``conv3d(x, w, b, padding=1)`` for a 3x3x3 kernel, by Winograd F(m, 3) along the last axis:
    the components' 3x3x1 convolutions each see W/m positions."""
    bt, g, at = (torch.tensor(a, dtype=torch.float64) for a in WINOGRAD[m])
    a = m + 2
    n, c, d, h, wd = x.shape
    t = wd // m
    xp = F.pad(x, (1, 1))
    y = torch.empty(n, w.shape[0], d, h, wd, memory_format=torch.channels_last_3d)
    wk = torch.einsum("kj,oidhj->koidh", g, w.double()).float().unsqueeze(-1)  # [a, Co, Ci, 3, 3, 1]
    comps = []
    for k in range(a):
        u = torch.empty(n, c, d, h, t, memory_format=torch.channels_last_3d).zero_()
        for j in range(a):
            if bt[k, j]:
                u.add_(xp[..., j : j + m * (t - 1) + 1 : m], alpha=float(bt[k, j]))
        comps.append(F.conv3d(u, wk[k], None, 1, (1, 1, 0)))
    for i in range(m):
        out = y[..., i::m]
        out.copy_(b.view(1, -1, 1, 1, 1).expand_as(out))
        for k in range(a):
            if at[i, k]:
                out.add_(comps[k], alpha=float(at[i, k]))
    return y


def best(f: Callable[[], object], repeats: int) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    from model.hagan.config import HAGANConfig
    from model.hagan.model import HAGANModel
    from model.hagan.networks import mixed_layout

    torch.manual_seed(0)
    m = HAGANModel.init(HAGANConfig(resolution=a.res), seed=0)
    net = m.net
    r, d = a.res, net.sub_depth
    per_call = HAGANModel.ENCODE_SLABS_PER_CALL
    slabs = (r // d) // per_call  # E^H calls per volume
    rows = []
    h = torch.rand(per_call, 1, d, r, r) * 2 - 1
    layers = [("E^H", c, slabs) for c in net.eh.convs] + [("E^G", c, 1) for c in [*net.eg.convs, net.eg.out]]
    feats = None
    for part, conv, calls in layers:
        if part == "E^G" and feats is None:
            feats = torch.rand(1, h.shape[1], h.shape[2] * (r // d), *h.shape[3:])  # the slabs' features stacked
            h = feats
        x = mixed_layout(h)
        wt, bias = conv.weight.detach(), conv.bias.detach()
        with torch.inference_mode():
            y = F.conv3d(x, wt, bias, conv.stride, conv.padding)
            t = best(
                lambda x=x, wt=wt, bias=bias, conv=conv: F.conv3d(x, wt, bias, conv.stride, conv.padding), a.repeats
            )
        macs = y.numel() * wt[0].numel() * calls
        rows.append((part, list(x.shape), list(wt.shape[2:]), conv.stride[0], t * calls, macs / 1e9))
        h = F.relu(y)
    cpu = platform.processor() or platform.machine()
    print(f"CPU: {cpu}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"\nE^H and E^G convolutions at {r}^3, full width, per volume (fp32, the encode path's layouts)\n")
    print("| part | input per call | kernel | stride | time per volume (ms) | GMAC | GMAC/s |")
    print("|---|---|---|---|---|---|---|")
    total = 0.0
    for part, shape, k, s, t, gmac in rows:
        total += t
        print(f"| {part} | {shape} | {k} | {s} | {t * 1e3:.0f} | {gmac:.2f} | {gmac / t:.0f} |")
    print(f"| all | | | | {total * 1e3:.0f} | {sum(r[5] for r in rows):.1f} | |")

    conv = net.eh.convs[-2]  # the 3x3x3 layer
    x = mixed_layout(torch.randn(per_call, conv.in_channels, d // 2, r // 2, r // 2))
    wt, bias = conv.weight.detach(), conv.bias.detach()
    with torch.inference_mode():
        ref = F.conv3d(x, wt, bias, 1, 1)
        print(f"\nE^H's 3x3x3 convolution, one call ({list(x.shape)}), direct against Winograd along W\n")
        print("| method | multiplications | time (ms) | largest difference | largest output |")
        print("|---|---|---|---|---|")
        t = best(lambda: F.conv3d(x, wt, bias, 1, 1), a.repeats)
        print(f"| direct (oneDNN) | 1x | {t * 1e3:.0f} | 0 | {ref.abs().max():.2f} |")
        for mm in (2, 4):
            err = (winograd_w(x, wt, bias, mm) - ref).abs().max()
            t = best(lambda mm=mm: winograd_w(x, wt, bias, mm), a.repeats)
            print(f"| Winograd F({mm}, 3) along W | {3 * mm / (mm + 2):.1f}x fewer | {t * 1e3:.0f} | {err:.1e} | |")
            # its component convolutions alone (the transforms' inputs made beforehand)
            u = mixed_layout(torch.randn(*x.shape[:4], x.shape[4] // mm))
            wk = torch.randn(conv.out_channels, conv.in_channels, 3, 3, 1)
            t = best(lambda u=u, wk=wk, mm=mm: [F.conv3d(u, wk, None, 1, (1, 1, 0)) for _ in range(mm + 2)], a.repeats)
            print(f"| F({mm}, 3): its {mm + 2} component convolutions alone | | {t * 1e3:.0f} | | |")


if __name__ == "__main__":
    main()

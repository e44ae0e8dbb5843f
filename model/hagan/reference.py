"""A plain functional re-statement of the authors' HA-GAN inference path, keyed by their state-dict
names (``fc1``, ``tp_conv1..7``, ``bn1..6``).  It is the yardstick for the conversion test (our
generator on converted weights must equal it) and the "plain path" in the benchmarks.  Nothing
here is used to serve models."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def authors_generate(sd: dict[str, torch.Tensor], z: torch.Tensor, resolution: int) -> torch.Tensor:
    """Eval-mode Generator.forward of the authors' 128^3 / 256^3 models on the whole volume."""
    h = F.linear(z, sd["fc1.weight"], sd["fc1.bias"])
    h = h.view(z.shape[0], sd["tp_conv1.weight"].shape[1], 4, 4, 4)
    ups = {1: False, 2: True, 3: True, 4: True, 5: resolution == 256, 6: True, 7: True}
    for i in range(1, 8):
        if ups[i]:
            h = F.interpolate(h, scale_factor=2)
        h = F.conv3d(h, sd[f"tp_conv{i}.weight"], sd[f"tp_conv{i}.bias"], padding=1)
        if i < 7:
            h = F.relu(F.group_norm(h, 8, sd[f"bn{i}.weight"], sd[f"bn{i}.bias"]))
    return torch.tanh(h)


@torch.inference_mode()
def authors_encode(e_sd: dict[str, torch.Tensor], sub_e_sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """E (E^H) on the 8 non-overlapping depth slabs, concatenated, then Sub_E (E^G)."""
    depth = x.shape[2] // 8
    feats = []
    for s in range(0, x.shape[2], depth):
        h = x[:, :, s : s + depth]
        for i, (st, p) in enumerate([(2, 1), (1, 1), (2, 1)], start=1):
            h = F.conv3d(h, e_sd[f"conv{i}.weight"], e_sd[f"conv{i}.bias"], stride=st, padding=p)
            h = F.relu(F.group_norm(h, 8, e_sd[f"bn{i}.weight"], e_sd[f"bn{i}.bias"]))
        feats.append(h)
    h = torch.cat(feats, dim=2)
    nums = sorted(int(k[4:-7]) for k in sub_e_sd if k.startswith("conv") and k.endswith(".weight"))
    for n in nums[:-1]:
        h = F.conv3d(h, sub_e_sd[f"conv{n}.weight"], sub_e_sd[f"conv{n}.bias"], stride=2, padding=1)
        h = F.relu(F.group_norm(h, 8, sub_e_sd[f"bn{n}.weight"], sub_e_sd[f"bn{n}.bias"]))
    last = nums[-1]
    return F.conv3d(h, sub_e_sd[f"conv{last}.weight"], sub_e_sd[f"conv{last}.bias"]).flatten(1)

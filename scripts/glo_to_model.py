"""An HA-GAN model directory from a generator fitted by generative latent optimisation (GLO).

``benchmarks/probe_g_fit.py --learn-codes --save STATE`` fits G (G^A, G^L, G^H) to every training
volume, each from a latent of its own, by L1 alone.  This writes a served model from it:

* G's weights from STATE;
* the codes' Gaussian folded into G^A's first layer, as the trainer's latent refit does
  (``Trainer.refit_latent``): the codes' mean m and covariance S = V diag(lam) V^T, its eigenvalues
  floored at ``--floor`` times their mean, c = m + t S^(1/2) z, so a sampled z ~ N(0, I) stands for a
  code drawn from that Gaussian (``--temperature`` t, 1 by default, widens or narrows it);
* D and the encoders from ``--template`` (a model directory of the same architecture), to be trained
  further through the frozen G (``voxgen train --init-from OUT --freeze-g on``): the template's
  encoders map into the template's latent space, not this one.

    python scripts/glo_to_model.py --state STATE --template models/demo-brain-mri -o OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", required=True, help="probe_g_fit.py --save output (safetensors)")
    ap.add_argument("--template", required=True, help="a HA-GAN model directory of the same architecture")
    ap.add_argument("--floor", type=float, default=0.01, help="eigenvalue floor, a fraction of their mean")
    ap.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampled codes' spread around their mean, a multiple of the codes' own (default 1)",
    )
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    if not a.temperature > 0:
        ap.error("--temperature must be > 0")
    from safetensors import safe_open

    from model.hagan.networks import code_gaussian, fold_code_gaussian
    from model.registry import from_pretrained

    m = from_pretrained(a.template)
    with safe_open(a.state, "pt") as f:
        g = {k: f.get_tensor(k) for k in f.keys() if k != "codes"}
        codes = f.get_tensor("codes")
        iteration = int(f.metadata().get("iteration", 0))
    own = m.net.state_dict()
    missing = sorted(k for k in own if k.split(".")[0] in ("ga", "gl", "gh") and k not in g)
    if missing:
        raise SystemExit(f"{a.state} lacks G weights: {', '.join(missing[:5])}")
    bad = [k for k, v in g.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise SystemExit(f"{a.state} does not fit {a.template}'s architecture: {', '.join(bad[:5])}")
    m.net.load_state_dict(g, strict=False)
    mean, root, _, lam = code_gaussian(codes, a.floor)
    fold_code_gaussian(m.net.ga.fc, mean, root * a.temperature)
    m.config.description = (
        f"HA-GAN G fitted by GLO ({len(codes)} volumes, {iteration} iterations; the codes' Gaussian folded into "
        f"G^A), D and encoders from {Path(a.template).name}: train the encoders with --freeze-g on"
    )
    training = dict(m.config.training or {})
    training.update(glo_iterations=iteration, glo_volumes=len(codes), glo_floor=a.floor, glo_temperature=a.temperature)
    m.config.training = training
    out = m.save_pretrained(a.output)
    print(f"{out}: codes |mean| {float(mean.norm()):.2f}, largest sd {float(lam.max().sqrt()):.2f}")


if __name__ == "__main__":
    main()

"""3D alpha-WGAN-GP training (Kwon et al., MICCAI 2019, section 2, eqs. 1-3).

One step, in the paper's order (encoder-generator, discriminator, code discriminator):

1. E and G, as one network, **twice** ("since the generator has slower optimization speed, we
   update it twice in one step"), each time on a fresh real batch x and fresh z_r ~ N(0, I):
   ``L_EG = -D(G(E(x))) - D(G(z_r)) - C(E(x)) + lambda_rec * |x - G(E(x))|_1`` (means over the
   batch; the L1 term is the mean absolute error, lambda_rec = 10).
2. D on a fresh real batch: ``L_D = D(G(z_e)) + D(G(z_r)) - 2 D(x) + lambda * (GP(x, G(z_r)) +
   GP(x, G(z_e)))``: both kinds of generated volumes are "fake", each with its own gradient
   penalty on random interpolates with the real batch, lambda = 10.
3. C: ``L_C = C(z_e) - C(z_r) + lambda * GP(z_r, z_e)`` (prior codes are "real").

Adam with lr 2e-4 for all four networks and batch 4, as the paper says; it does not give Adam's
betas, so PyTorch's defaults (0.9, 0.999) are used (``betas`` option), as in the authors' notebook.
Real volumes come from a prepared dataset (128^3 or 256^3 cubes) area-averaged to 64^3 once by
``model.data.grid.resample`` (as ``encode`` does to a served scan's cube; the config records the
dataset's preprocessing and cube, ``preprocess`` and ``data_resolution``) and kept in memory, with
a random left-right flip (the paper's augmentation; its intensity randomisation is not specified
and not done here).  The paper's critic D uses BatchNorm although the gradient penalty assumes a
per-sample critic; we follow the paper.

Where this differs from the authors' public training notebook (cyclomon/3dbraingen,
Alpha_WGAN_ADNI_train.ipynb, as read at commit 4223902): there the E/G loss leaves out the
code-discriminator term (computed, never added), so the encoder is not pushed towards the prior;
the code discriminator's loss reuses that term, built while C was frozen, so C gets no gradient
from encoded codes (only from prior samples and the penalty); and "G updated twice" is the
generator's optimiser stepping twice on one backward pass.  Here eqs. 1-3 are implemented as
written, and each of the two E/G updates has its own batch, forward and backward.

Checkpoints are model directories plus optimiser and RNG state in safetensors/JSON (no pickles), in
the layout every family shares (model/checkpoint.py); ``resume`` continues bit for bit.  The run
folder mirrors HA-GAN's: ``checkpoints/iter_N/``, ``latest.json`` (written last), ``metrics.jsonl``,
``previews/``, ``model/``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.alphawgan.config import RESOLUTION, AlphaWGANConfig
from model.alphawgan.networks import AlphaWGAN
from model.base import Progress
from model.checkpoint import latest_checkpoint, read_training_checkpoint
from model.data.augment import RandomAugment, diff_augment
from model.data.datasets import VolumeDataset
from model.data.grid import resample
from model.training import (
    LOOP_DEFAULTS,
    RECIPE_DEFAULTS,
    QualityMonitor,
    dataset_fields,
    recipe_options,
    recipe_record,
    resume_checkpoint,
    write_checkpoint,
)

DEFAULTS: dict[str, Any] = LOOP_DEFAULTS | {
    "batch": 4,
    "width": 1.0,
    "latent_dim": 1000,
    "code_hidden": 4096,
    "lr": 2e-4,
    "betas": (0.9, 0.999),
    "lambda_gp": 10.0,
    "lambda_rec": 10.0,
    "g_updates": 2,
    "flip": True,
    # the small-data recipe's parts (model/training.py RECIPE_DEFAULTS) and an EMA of G
    **RECIPE_DEFAULTS,
    "ema": 0.0,  # EMA decay of G, served (0: off); ramped up over the G updates (Trainer._ema_update)
}
# ``recipe: small-data``: the real volumes augmented afresh every iteration (after the flip), DiffAugment
# on every input of the critic D (real, reconstructed and random volumes; the gradient penalties on
# interpolates of the augmented ones), an EMA of G that is served, and the quality monitor keeping RUN/best
RECIPES: dict[str, dict[str, Any]] = {
    "authors": {},
    "small-data": {"augment": "on", "diffaug": "on", "ema": 0.999, "monitor_every": 100},
}
NETS = ("e", "g", "d", "c")


def gradient_penalty(
    critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """WGAN-GP's penalty E[(||grad critic(x_hat)||_2 - 1)^2] on x_hat = a real + (1 - a) fake,
    a ~ U(0, 1) per sample (drawn on the CPU from ``generator``)."""
    a = torch.rand(real.shape[0], *[1] * (real.ndim - 1), generator=generator).to(real.device)
    xh = (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(xh).sum(), xh, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class Trainer:
    def __init__(self, options: dict[str, Any], progress: Progress | None = None) -> None:
        from model.registry import resolve_device

        known = set(DEFAULTS) | {"data", "output"}  # other families' options are ignored
        self.o = recipe_options(DEFAULTS, RECIPES, {k: v for k, v in options.items() if v is not None and k in known})
        if not 0.0 <= float(self.o["ema"]) < 1.0:
            raise ValueError(f"ema must be a decay in [0, 1), got {self.o['ema']!r}")
        self.run = Path(self.o["output"])
        self.data = VolumeDataset(self.o["data"])
        if len(self.data) == 0:
            raise ValueError(f"{self.o['data']}: the dataset is empty")
        if self.data.resolution % RESOLUTION:
            raise ValueError(f"the dataset's {self.data.resolution}^3 grid cannot be averaged down to {RESOLUTION}^3")
        self.device = resolve_device(self.o["device"])
        self.progress = progress
        self.cfg = AlphaWGANConfig(
            latent_dim=int(self.o["latent_dim"]),
            width=float(self.o["width"]),
            code_hidden=int(self.o["code_hidden"]),
            description=f"3D alpha-WGAN-GP trained by voxgen train on {self.data.manifest.get('source', '?')}",
            **dataset_fields(self.data, (RESOLUTION,) * 3),
            training=recipe_record(self.o, DEFAULTS, ("augment", "diffaug", "ema")),
        )
        torch.manual_seed(int(self.o["seed"]))
        self.net = AlphaWGAN(self.cfg).to(self.device).train()
        betas = tuple(float(b) for b in self.o["betas"])
        self.opts = {
            k: torch.optim.Adam(getattr(self.net, k).parameters(), lr=float(self.o["lr"]), betas=betas) for k in NETS
        }
        self.gen = torch.Generator().manual_seed(int(self.o["seed"]) + 1)  # latents, interpolation weights
        self.rng = np.random.default_rng(int(self.o["seed"]) + 2)  # batches, flips
        self.iteration = 0
        self.fixed_z = torch.randn(4, self.cfg.latent_dim, generator=torch.Generator().manual_seed(1234))
        self._cache: dict[int, torch.Tensor] = {}
        self.aug_gen = torch.Generator().manual_seed(int(self.o["seed"]) + 3)  # augmentation, DiffAugment
        self.augment = RandomAugment() if self.o["augment"] == "on" else None
        self.ema_g: torch.nn.Module | None = None
        if float(self.o["ema"]) > 0:
            self.ema_g = copy.deepcopy(self.net.g).requires_grad_(False)
        self.quality = QualityMonitor(self.run, self.cfg.grid_shape, int(self.o["monitor_n"]), self.cfg.latent_dim)
        if self.o["resume"]:
            self._load_latest()

    # ------------------------------------------------------------------ data
    def volume(self, i: int) -> torch.Tensor:
        """Dataset item i on the 64^3 grid (area-averaged by ``model.data.grid.resample`` once, as
        ``AlphaWGANModel.encode`` does, then kept in memory)."""
        if i not in self._cache:
            v = torch.from_numpy(np.asarray(self.data.volume(i), np.float32))[None, None]
            self._cache[i] = resample(v, self.cfg.grid_shape)[0]
        return self._cache[i]

    def _batch(self) -> torch.Tensor:
        b = int(self.o["batch"])
        idx = self.rng.integers(0, len(self.data), size=b)
        flips = self.rng.random(b) < 0.5
        vols = [self.volume(int(i)) for i in idx]
        if self.o["flip"]:
            vols = [v.flip(-1) if fl else v for v, fl in zip(vols, flips, strict=True)]  # W = left-right
        x = torch.stack(vols)
        if self.augment is not None:  # each volume its own draw, afresh every iteration
            x = self.augment(x, self.aug_gen)
        return x.to(self.device)

    def _aug(self, x: torch.Tensor) -> torch.Tensor:
        """D's input: DiffAugmented with ``diffaug`` (differentiable in ``x``), else ``x``."""
        return diff_augment(x, self.aug_gen) if self.o["diffaug"] == "on" else x

    def _z(self, b: int) -> torch.Tensor:
        return torch.randn(b, self.cfg.latent_dim, generator=self.gen).to(self.device)

    def _gp(self, critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return gradient_penalty(critic, real, fake, self.gen)

    def _trainable(self, *names: str) -> None:
        for k in NETS:
            getattr(self.net, k).requires_grad_(k in names)

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, float]:
        net, lam = self.net, float(self.o["lambda_gp"])
        losses: dict[str, float] = {}
        b = int(self.o["batch"])

        # 1. encoder + generator, updated twice
        self._trainable("e", "g")
        for _ in range(int(self.o["g_updates"])):
            x = self._batch()
            z_e = net.e(x)
            x_rec = net.g(z_e)
            x_rand = net.g(self._z(b))
            rec = F.l1_loss(x_rec, x)
            adv = -net.d(self._aug(x_rec)).mean() - net.d(self._aug(x_rand)).mean()
            code = -net.c(z_e).mean()
            loss = adv + code + float(self.o["lambda_rec"]) * rec
            self.opts["e"].zero_grad(set_to_none=True)
            self.opts["g"].zero_grad(set_to_none=True)
            loss.backward()
            self.opts["e"].step()
            self.opts["g"].step()
            self._ema_update()
        losses |= {"eg": float(loss.detach()), "l1": float(rec.detach()), "eg_code": float(code.detach())}

        # 2. discriminator: reconstructions and random samples are both fake
        self._trainable("d")
        x = self._batch()
        with torch.no_grad():
            z_e = net.e(x)
            x_rec = net.g(z_e)
            z_r = self._z(b)
            x_rand = net.g(z_r)
        x, x_rec, x_rand = self._aug(x), self._aug(x_rec), self._aug(x_rand)
        d_real = net.d(x).mean()
        w = net.d(x_rec).mean() + net.d(x_rand).mean() - 2 * d_real
        gp = self._gp(net.d, x, x_rand) + self._gp(net.d, x, x_rec)
        loss_d = w + lam * gp
        self.opts["d"].zero_grad(set_to_none=True)
        loss_d.backward()
        self.opts["d"].step()
        losses |= {"d": float(loss_d.detach()), "d_gp": float(gp.detach()), "d_wdist": float(-w.detach() / 2)}

        # 3. code discriminator: prior codes are real, encoded codes are fake
        self._trainable("c")
        w_c = net.c(z_e).mean() - net.c(z_r).mean()
        gp_c = self._gp(net.c, z_r, z_e)
        loss_c = w_c + lam * gp_c
        self.opts["c"].zero_grad(set_to_none=True)
        loss_c.backward()
        self.opts["c"].step()
        losses |= {"c": float(loss_c.detach()), "c_gp": float(gp_c.detach())}
        self._trainable(*NETS)
        self.iteration += 1
        return losses

    def _ema_update(self) -> None:
        """EMA of G's weights after each G update, decay ramped up as min(ema, (1 + u) / (10 + u)) with
        u = iteration * g_updates (the updates of one iteration share it)."""
        if self.ema_g is None:
            return
        u = self.iteration * int(self.o["g_updates"])
        decay = min(float(self.o["ema"]), (1 + u) / (10 + u))
        with torch.no_grad():
            for pe, p in zip(self.ema_g.parameters(), self.net.g.parameters(), strict=True):
                pe.lerp_(p, 1.0 - decay)
            for be, b in zip(self.ema_g.buffers(), self.net.g.buffers(), strict=True):
                be.copy_(b)

    def served_state(self) -> dict[str, torch.Tensor]:
        """The weights a model directory holds: G from the EMA when there is one, E, D and C live."""
        sd = self.net.state_dict()
        if self.ema_g is not None:
            sd |= {f"g.{k}": v for k, v in self.ema_g.state_dict().items()}
        return sd

    # ------------------------------------------------------------------ quality monitor
    def monitor(self) -> dict[str, float]:
        """The shared quality monitor (model/training.py ``QualityMonitor``) on ``monitor_n`` volumes
        of the served G on the 64^3 grid; keeps the best model in RUN/best."""
        g = self.ema_g if self.ema_g is not None else self.net.g

        def generate(z: torch.Tensor) -> torch.Tensor:
            return g(z.to(self.device))

        g.eval()
        try:
            return self.quality(
                self.iteration,
                len(self.data),
                lambda i: self.volume(i)[0],
                generate,
                self.cfg.to_dict(),
                self.served_state,
            )
        finally:
            g.train()

    # ------------------------------------------------------------------ checkpoints
    def generators(self) -> dict[str, torch.Generator]:
        """The CPU generators a checkpoint keeps (``rng.<name>``)."""
        return {"latents": self.gen, "augment": self.aug_gen}

    def save_checkpoint(self) -> Path:
        live = {}  # the served G is the EMA; the live G goes with the training state
        if self.ema_g is not None:
            live = {f"live.g.{k}": v for k, v in self.net.g.state_dict().items()}
        return write_checkpoint(self, self.served_state(), extra=live, state={"best": self.quality.best})

    def _load_latest(self) -> None:
        ck = read_training_checkpoint(latest_checkpoint(self.run))
        saved = dict(ck.config())
        for k in ("preprocess", "data_resolution"):  # not recorded by older runs: this run's dataset's
            saved.setdefault(k, getattr(self.cfg, k))
        saved["training"] = self.cfg.training  # the recipe may change on resume; it is recorded as trained now
        if AlphaWGANConfig.from_dict(saved).to_dict() != self.cfg.to_dict():
            raise ValueError(
                f"{ck.path}: the checkpoint's config differs from this run's options (width, latent_dim, ...)"
            )
        served, live = ck.weights(), ck.extra("live.")
        if self.ema_g is not None:  # (a run without an EMA resumed with one: the EMA starts from its G)
            self.ema_g.load_state_dict({k[2:]: v for k, v in served.items() if k.startswith("g.")})
        self.net.load_state_dict(served | live)
        self.quality.best = ck.state.get("best")
        resume_checkpoint(self, ck)

    # ------------------------------------------------------------------ previews and the loop
    @torch.no_grad()
    def preview(self) -> Path:
        from model.preview import montage_png

        g = self.ema_g if self.ema_g is not None else self.net.g
        g.eval()
        vols = g(self.fixed_z.to(self.device)).float().cpu().numpy()[:, 0]
        g.train()
        return montage_png(vols, self.run / "previews" / f"iter_{self.iteration:07d}.png", min_tile=64)

    def fit(self) -> Path:
        from model.training import fit_loop

        return fit_loop(self)


def train(options: dict[str, Any], progress: Progress | None = None) -> Path:
    """Train (or resume) an alpha-WGAN-GP run; returns the finished model directory (RUN/model)."""
    return Trainer(options, progress).fit()

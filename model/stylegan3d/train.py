"""Training of 3D-StyleGAN / 3D Split&Shuffle-GAN (and of their 2D versions, for inflation).

The StyleGAN2 objective (Karras et al. 2020) as Liu et al. (2022) configure it:

* non-saturating logistic loss: G minimises softplus(-D(G(z))), D minimises softplus(D(G(z))) +
  softplus(-D(x));
* lazy R1 on real data every ``r1_every`` (16) iterations, gamma 0.0512, weighted by the interval;
* lazy path-length regularisation of G every ``pl_every`` (4) iterations (weight 2, decay 0.01,
  half the batch), weighted by the interval;
* style-mixing regularisation: with probability 0.9 a batch uses two latents, switching at a
  random layer;
* Adam betas (0, 0.99), lr 0.0025 from scratch and 0.002 when initialised by inflation; for the
  lazily regularised networks lr and betas are adjusted by c = interval / (interval + 1), as
  StyleGAN2 does;
* an exponential moving average of G (half-life ``ema_kimg`` thousand images, default 10 per 32
  images of batch, ramped up over the first images) is the generator that is saved and served.

Data: a dataset made by ``voxgen prepare`` (cubes R^3 in [-1, 1]); each volume is resampled to
the config's grid by ``model.data.grid.resample``, as a projection target is
(``StyleGAN3DModel.to_grid``; the config records the dataset's preprocessing and cube,
``preprocess`` and ``data_resolution``); with ``dims=2`` the batches are axial slices (H, W) of
that grid.  ``init_from`` (a 2D run folder or 2D model directory) starts a 3D run from the
inflated 2D weights (``inflate.py``).

Run folder (as HA-GAN's trainer): ``checkpoints/iter_N/`` is a model directory (config.json and
model.safetensors holding G_ema and D, servable as it is) plus ``train.safetensors`` (the raw G,
the optimizer moments, the RNG states, the path-length mean) and ``state.json`` (iteration,
options, optimizer hyper-parameters, the numpy RNG), in the training-checkpoint layout every family
shares (model/checkpoint.py); ``latest.json`` is written last, after the
checkpoint and ``model/`` are complete; ``metrics.jsonl`` has the losses of every iteration;
``previews/iter_N.png`` the middle axial, coronal and sagittal slices of four fixed latents (2D:
four slices).  ``resume`` continues bit for bit on the same device.

Data-parallel under torchrun (model/distributed.py): each rank computes rows [lo, hi) of the global
``batch`` (which the world size must divide) and reads only those volumes; the indices, latents,
mixing draws, the noise inputs and the path-length noise are drawn for the whole batch on every rank
and sliced, the minibatch standard deviation of D gathers the global batch (differentiably, R1
included), and ``w_avg`` and the path-length mean move by the global batch's means, so an iteration is
the single-process one at the global batch.  The gradients are averaged over the ranks before each
optimizer step (``distributed.average_gradients``, what DDP's reducer does; DDP itself does not support
the double backward of R1 and the path-length term, and StyleGAN2-ADA averages the same way).  The
path-length batch (``batch // pl_batch_shrink``) is rounded up to a multiple of the world size (the
one departure from the single-process run: StyleGAN2-ADA takes it per GPU).  Rank 0 alone writes;
checkpoints resume with any number of ranks.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model import distributed
from model.base import Progress
from model.checkpoint import (
    ModelDirError,
    TrainingCheckpoint,
    find_model_dir,
    latest_checkpoint,
    read_training_checkpoint,
)
from model.data.augment import RandomAugment, diff_augment
from model.data.datasets import VolumeDataset
from model.data.grid import volume_to_grid
from model.stylegan3d.config import StyleGAN3DConfig
from model.stylegan3d.inflate import STRATEGIES, inflate_network
from model.stylegan3d.networks import StyleGAN3D
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
    "family": "splitshuffle",
    "batch": None,  # default: 4 volumes (dims=3) or 16 slices (dims=2)
    # network (ignored on resume and, except shape, with init_from: the checkpoint / 2D model decides)
    "shape": None,  # "DxHxW"; default 32x64x64 (or the 2D model's)
    "variant": None,  # default: the family's own
    "dims": 3,
    "channels": None,  # default 32 (the paper's), or 32 * width
    "width": None,
    "latent_dim": None,  # z and w size, default 64
    "mapping_width": None,  # default 64
    # objective
    "lr": None,  # default 0.0025 from scratch, 0.002 from inflated weights
    "r1_gamma": 0.0512,
    "r1_every": 16,
    "pl_weight": 2.0,
    "pl_every": 4,
    "pl_decay": 0.01,
    "pl_batch_shrink": 2,
    "style_mixing": 0.9,
    "ema_kimg": None,  # default batch * 10 / 32
    "ema_rampup": 0.05,
    # 2D -> 3D
    "init_from": None,
    "inflate": "inflate-1",
    "inflate_parts": "gd",
    # the small-data recipe's parts (model/training.py RECIPE_DEFAULTS; the EMA of G is always on)
    **RECIPE_DEFAULTS,
}
# ``recipe: small-data``: the real volumes augmented afresh every iteration (3D affine, elastic, bias
# field, gamma, noise: model/data/augment.py; for --dims 2 the volumes are augmented, then sliced),
# DiffAugment on every input of D (real, generated and R1's reals, differentiably; StyleGAN2 + DiffAugment
# as Zhao et al. 2020 train on 100-image sets), and the quality monitor (3D runs) keeping RUN/best
RECIPES: dict[str, dict[str, Any]] = {
    "authors": {},
    "small-data": {"augment": "on", "diffaug": "on", "monitor_every": 100},
}
LR_SCRATCH, LR_INFLATED = 0.0025, 0.002
GRID_CACHE_BYTES = 2 << 30  # resampled volumes are kept in memory up to this size


def parse_shape(shape: Any) -> tuple[int, int, int]:
    """ "32x64x64" or a sequence of three ints -> (D, H, W)."""
    if isinstance(shape, str):
        try:
            parts = tuple(int(s) for s in shape.lower().split("x"))
        except ValueError:
            parts = ()
    else:
        parts = tuple(int(s) for s in shape)
    if len(parts) != 3:
        raise ValueError(f"shape must be DxHxW, e.g. 32x64x64, got {shape!r}")
    return parts  # type: ignore[return-value]


class Trainer:
    """One run: ``fit()`` trains to ``iterations`` (resuming from the run's last checkpoint with
    ``resume``) and returns RUN/model."""

    def __init__(self, options: dict[str, Any], progress: Progress | None = None) -> None:
        from model.registry import resolve_device

        given = {k: v for k, v in options.items() if v is not None}
        self.o = recipe_options(DEFAULTS, RECIPES, given)
        self.run = Path(self.o["output"])
        self.progress = progress
        self.data = VolumeDataset(self.o["data"])
        if len(self.data) == 0:
            raise ValueError(f"{self.o['data']}: the dataset is empty")
        self.device = resolve_device(self.o["device"])
        if self.device.type == "cuda":  # deterministic kernels, so that resume is exact on the device
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        seed = int(self.o["seed"])
        self.init_info: dict[str, Any] | None = None
        ck = read_training_checkpoint(latest_checkpoint(self.run)) if self.o["resume"] else None
        if ck is not None:
            saved = dict(ck.config())
            saved.setdefault("preprocess", self.data.cube().preprocess)  # not recorded by older runs
            self.cfg = StyleGAN3DConfig.from_dict(saved)
            torch.manual_seed(seed)
            self.net = StyleGAN3D(self.cfg)
        elif self.o["init_from"]:
            self.net = self._inflated(seed)
            self.cfg = self.net.config
        else:
            self.cfg = self._config_from_options()
            torch.manual_seed(seed)
            self.net = StyleGAN3D(self.cfg)
        self._check_data()
        # what this run trains with now (a resumed run may change its recipe; HA-GAN records the same way)
        self.cfg.training = recipe_record(self.o, DEFAULTS, ("augment", "diffaug"))
        self.G, self.D = self.net.G, self.net.D
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.net.to(self.device).train()
        self.G_ema.to(self.device)

        self.batch = int(self.o["batch"] or (4 if self.cfg.dims == 3 else 16))
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        self.rows = distributed.part(self.batch)  # this rank's rows of the global batch
        inflated = bool(self.o["init_from"]) if ck is None else bool(ck.state.get("init"))
        self.lr = float(self.o["lr"] or (LR_INFLATED if inflated else LR_SCRATCH))
        self.opts = {
            "g": self._adam(self.G.parameters(), int(self.o["pl_every"]) if self.o["pl_weight"] > 0 else 0),
            "d": self._adam(self.D.parameters(), int(self.o["r1_every"]) if self.o["r1_gamma"] > 0 else 0),
        }
        self.pl_mean = torch.zeros([], device=self.device)
        self.gen = torch.Generator().manual_seed(seed + 1)  # latents and mixing (CPU: same on any device)
        self.rng = np.random.default_rng(seed + 2)  # batches
        self.iteration = 0
        self.fixed_z = torch.randn(4, self.cfg.z_dim, generator=torch.Generator().manual_seed(1234))
        self._grid: dict[int, np.ndarray] = {}
        n_vox = int(np.prod(self.cfg.shape))
        self._cache = len(self.data) * n_vox * 4 <= GRID_CACHE_BYTES
        torch.manual_seed(seed + 3)  # the noise inputs and the path-length noise (the device's generator)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed + 3)
        self.aug_gen = torch.Generator().manual_seed(seed + 4)  # augmentation and DiffAugment (CPU)
        self.augment = RandomAugment() if self.o["augment"] == "on" else None
        if self.cfg.dims == 2 and int(self.o["monitor_every"]):
            if "monitor_every" in given:
                raise ValueError("the quality monitor scores 3D volumes; a --dims 2 run has none")
            self.o["monitor_every"] = 0  # the recipe's monitor is for 3D runs
        self.quality = QualityMonitor(self.run, self.cfg.shape, int(self.o["monitor_n"]), self.cfg.z_dim)
        if ck is not None:
            self._load_checkpoint(ck)
            self.rows = distributed.part(self.batch)  # the checkpoint's batch
        distributed.broadcast_module(self.net)
        distributed.broadcast_module(self.G_ema)

    # ------------------------------------------------------------------ construction
    def _adam(self, params: Any, interval: int) -> torch.optim.Adam:
        c = interval / (interval + 1) if interval > 0 else 1.0  # lazy regularisation (StyleGAN2, appendix C)
        return torch.optim.Adam(params, lr=self.lr * c, betas=(0.0, 0.99**c), eps=1e-8)

    def _description(self, cfg_family: str, variant: str | None, dims: int, extra: str = "") -> str:
        src = self.data.manifest.get("source", "?")
        what = f"{cfg_family} ({variant or 'custom'}, {'2D slices' if dims == 2 else '3D'})"
        return f"{what} trained by voxgen train on {src}{extra}"

    def _config_from_options(self) -> StyleGAN3DConfig:
        o = self.o
        family = o["family"]
        shape = parse_shape(o["shape"] or "32x64x64")
        kw: dict[str, Any] = {"shape": shape, "dims": int(o["dims"])}
        if o["channels"] is not None:
            kw["channels"] = int(o["channels"])
        elif o["width"] is not None:
            kw["channels"] = max(2, 2 * round(16 * float(o["width"])))
        if o["latent_dim"] is not None:
            kw["z_dim"] = kw["w_dim"] = int(o["latent_dim"])
        if o["mapping_width"] is not None:
            kw["mapping_width"] = int(o["mapping_width"])
        cfg = StyleGAN3DConfig.for_variant(family, o["variant"], **kw, **dataset_fields(self.data, shape))
        cfg.description = self._description(family, cfg.variant, cfg.dims)
        return cfg

    def _inflated(self, seed: int) -> StyleGAN3D:
        """The 3D network inflated from the 2D model named by ``init_from``."""
        from model.stylegan3d.model import StyleGAN3DModel

        o = self.o
        if int(o["dims"]) != 3:
            raise ValueError("--init-from inflates a 2D model into a 3D run; use it with --dims 3")
        if o["inflate"] not in STRATEGIES:
            raise ValueError(f"unknown inflation strategy {o['inflate']!r}; use one of {', '.join(STRATEGIES)}")
        parts = tuple(p.upper() for p in str(o["inflate_parts"]))
        if not parts or any(p not in ("G", "D") for p in parts):
            raise ValueError(f"inflate_parts must be g, d or gd, got {o['inflate_parts']!r}")
        src = find_model_dir(o["init_from"])
        try:
            m2 = StyleGAN3DModel.from_pretrained(src)
        except ModelDirError as e:
            raise ValueError(f"--init-from: {e}") from e
        c2 = m2.config
        if c2.dims != 2:
            raise ValueError(f"--init-from {src}: a 3D model (dims={c2.dims}); inflation needs a 2D model (--dims 2)")
        if c2.family != o["family"]:
            raise ValueError(f"--init-from {src}: family {c2.family!r}, this run trains {o['family']!r}")
        if o["variant"] and o["variant"] != c2.variant:
            raise ValueError(f"--init-from {src}: variant {c2.variant!r}, not {o['variant']!r}")
        if c2.modality != self.data.manifest["modality"]:
            raise ValueError(
                f"--init-from {src}: a {c2.modality} model; the dataset is {self.data.manifest['modality']}"
            )
        shape = parse_shape(o["shape"]) if o["shape"] else c2.shape
        if tuple(shape[1:]) != tuple(c2.shape[1:]):
            raise ValueError(
                f"--init-from {src}: slices of {c2.shape[1]}x{c2.shape[2]}; shape {shape} differs in-plane"
            )
        d = c2.to_dict() | {"dims": 3, "shape": list(shape)} | dataset_fields(self.data, shape)
        d["description"] = self._description(
            c2.family, c2.variant, 3, f", initialised by {o['inflate']} ({'+'.join(parts)}) from the 2D model {src}"
        )
        cfg3 = StyleGAN3DConfig.from_dict(d)
        self.init_info = {"from": str(src), "strategy": o["inflate"], "parts": list(parts)}
        return inflate_network(m2.net, o["inflate"], parts, seed=seed, config3=cfg3)

    def _check_data(self) -> None:
        mf = self.data.manifest
        if mf["modality"] != self.cfg.modality:
            raise ValueError(f"the dataset is {mf['modality']}, the model {self.cfg.modality}")

    # ------------------------------------------------------------------ data
    def _volume(self, i: int) -> np.ndarray:
        """Volume ``i`` on the model's 3D grid (D, H, W), float32."""
        v = self._grid.get(i)
        if v is None:
            v = volume_to_grid(self.data.volume(i), self.cfg.shape)
            if self._cache:
                self._grid[i] = v
        return v

    def _part(self) -> tuple[int, int, int] | None:
        """(global batch, lo, hi) of this rank's rows in a distributed run; None in one process."""
        lo, hi = self.rows
        return None if (lo, hi) == (0, self.batch) else (self.batch, lo, hi)

    def _batch(self) -> torch.Tensor:
        b = self.batch
        lo, hi = self.rows  # this rank's shard of the global batch: only its volumes are read
        idx = self.rng.integers(0, len(self.data), size=b)
        vols = torch.from_numpy(np.stack([self._volume(int(i)) for i in idx[lo:hi]]))[:, None]
        if self.augment is not None:  # each volume its own draw, afresh every iteration
            vols = self.augment(vols, self.aug_gen, rows=self._part())
        if self.cfg.dims == 3:
            return vols.to(self.device)
        sl = self.rng.integers(0, self.cfg.shape[0], size=b)
        return torch.stack([v[:, int(s)] for v, s in zip(vols, sl[lo:hi], strict=True)]).to(self.device)

    def _d(self, x: torch.Tensor) -> torch.Tensor:
        """D's logits, on DiffAugmented input with ``diffaug`` (differentiable in ``x``)."""
        if self.o["diffaug"] == "on":
            x = diff_augment(x, self.aug_gen, rows=self._part())
        return self.D(x)

    # ------------------------------------------------------------------ one iteration
    def _ws(self, n: int, update_w_avg: bool = False, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-layer styles for ``n`` fresh latents, with style mixing at a random layer; with ``rows``
        (lo, hi) the latents of rows [lo, hi) of those ``n`` (all ``n`` are drawn)."""
        lo, hi = rows if rows is not None else (0, n)
        z = torch.randn(n, self.cfg.z_dim, generator=self.gen)[lo:hi].to(self.device)
        ws = self.G.mapping(z, update_w_avg=update_w_avg)
        p = float(self.o["style_mixing"])
        if p > 0:
            mix = float(torch.rand([], generator=self.gen)) < p
            cutoff = int(torch.randint(1, ws.shape[1], [], generator=self.gen)) if ws.shape[1] > 1 else 1
            if mix and cutoff < ws.shape[1]:
                z2 = torch.randn(n, self.cfg.z_dim, generator=self.gen)[lo:hi].to(self.device)
                ws = torch.cat([ws[:, :cutoff], self.G.mapping(z2)[:, cutoff:]], 1)
        return ws

    def _step(self, name: str) -> None:
        """One optimizer step on the gradients averaged over the ranks (a distributed run)."""
        net = self.G if name == "g" else self.D
        distributed.average_gradients(net.parameters())
        self.opts[name].step()

    def step(self) -> dict[str, float]:
        G, D, o, t, b = self.G, self.D, self.o, self.iteration, self.batch
        losses: dict[str, float] = {}
        real = self._batch()
        lo, hi = self.rows  # inside distributed.rows: noise and minibatch std of the global batch

        # G: non-saturating logistic loss
        G.requires_grad_(True)
        D.requires_grad_(False)
        with distributed.rows(b, lo, hi):
            logits = self._d(G.synthesis(self._ws(b, update_w_avg=True, rows=self.rows)))
            g_loss = F.softplus(-logits).mean()
            self.opts["g"].zero_grad(set_to_none=True)
            g_loss.backward()
        self._step("g")
        losses["g"] = float(g_loss.detach())

        # G: lazy path-length regularisation
        if o["pl_weight"] > 0 and t % int(o["pl_every"]) == 0:
            n = max(1, b // int(o["pl_batch_shrink"]))
            w = distributed.context().world
            n = -(-n // w) * w  # a multiple of the ranks (the same n in one process)
            plo, phi = distributed.part(n, "path-length batch")
            with distributed.rows(n, plo, phi):
                ws = self._ws(n, rows=(plo, phi))
                img = G.synthesis(ws)
                if (plo, phi) == (0, n):
                    noise = torch.randn_like(img)
                else:  # the global batch's noise, this rank's rows
                    noise = distributed.randn_rows(phi - plo, tuple(img.shape[1:]), device=img.device, dtype=img.dtype)
                noise = noise / math.sqrt(img[0, 0].numel())
                (grad,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
                lengths = grad.square().sum(2).mean(1).sqrt()
                batch_mean = distributed.mean_over_ranks(lengths.mean().detach())
                self.pl_mean.copy_(self.pl_mean.lerp(batch_mean, float(o["pl_decay"])))
                pl = (lengths - self.pl_mean).square().mean()
                self.opts["g"].zero_grad(set_to_none=True)
                (pl * float(o["pl_weight"]) * int(o["pl_every"])).backward()
            self._step("g")
            losses["pl"], losses["pl_mean"] = float(pl.detach()), float(self.pl_mean)

        # D: logistic loss on generated and real data
        G.requires_grad_(False)
        D.requires_grad_(True)
        with distributed.rows(b, lo, hi):
            with torch.no_grad():
                fake = G.synthesis(self._ws(b, rows=self.rows))
            d_fake = F.softplus(self._d(fake)).mean()
            d_real = F.softplus(-self._d(real)).mean()
            self.opts["d"].zero_grad(set_to_none=True)
            (d_fake + d_real).backward()
        self._step("d")
        losses["d_fake"], losses["d_real"] = float(d_fake.detach()), float(d_real.detach())

        # D: lazy R1 on real data
        if o["r1_gamma"] > 0 and t % int(o["r1_every"]) == 0:
            x = real.detach().requires_grad_(True)
            with distributed.rows(b, lo, hi):
                (grad,) = torch.autograd.grad(self._d(x).sum(), x, create_graph=True)
                r1 = grad.square().flatten(1).sum(1).mean()
                self.opts["d"].zero_grad(set_to_none=True)
                (r1 * (float(o["r1_gamma"]) / 2) * int(o["r1_every"])).backward()
            self._step("d")
            losses["r1"] = float(r1.detach())
        G.requires_grad_(True)

        self.iteration += 1
        self._update_ema()
        return distributed.average_scalars(losses)

    @torch.no_grad()
    def _update_ema(self) -> None:
        b = self.batch
        ema_nimg = float(self.o["ema_kimg"] if self.o["ema_kimg"] is not None else b * 10 / 32) * 1000
        if self.o["ema_rampup"]:
            ema_nimg = min(ema_nimg, self.iteration * b * float(self.o["ema_rampup"]))
        beta = 0.5 ** (b / max(ema_nimg, 1e-8))
        for pe, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            pe.copy_(p.detach().lerp(pe, beta))
        for be, bb in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            be.copy_(bb)

    # ------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict[str, torch.Tensor]:
        """The served model: G_ema as G, and D."""
        return {f"G.{k}": v for k, v in self.G_ema.state_dict().items()} | {
            f"D.{k}": v for k, v in self.D.state_dict().items()
        }

    def generators(self) -> dict[str, torch.Generator]:
        """The CPU generators a checkpoint keeps (``rng.<name>``)."""
        return {"latents": self.gen, "augment": self.aug_gen}

    def save_checkpoint(self) -> Path:
        extra = {f"G_raw.{k}": v for k, v in self.G.state_dict().items()} | {"pl_mean": self.pl_mean}
        state = {"init": self.init_info, "lr": self.lr, "batch": self.batch, "best": self.quality.best}
        return write_checkpoint(self, self._model_state(), extra=extra, state=state)

    def _load_checkpoint(self, ck: TrainingCheckpoint) -> None:
        self.init_info = ck.state.get("init")
        self.batch, self.lr = int(ck.state["batch"]), float(ck.state["lr"])
        weights = ck.weights()
        self.G_ema.load_state_dict({k[2:]: v for k, v in weights.items() if k.startswith("G.")})
        self.D.load_state_dict({k[2:]: v for k, v in weights.items() if k.startswith("D.")})
        self.G.load_state_dict(ck.extra("G_raw."))
        self.pl_mean.copy_(ck.extra()["pl_mean"])
        self.quality.best = ck.state.get("best")
        resume_checkpoint(self, ck)

    # ------------------------------------------------------------------ previews and the loop
    @torch.no_grad()
    def preview(self) -> Path:
        """Middle axial, coronal and sagittal slices of four fixed latents (G_ema, constant noise)."""
        from model.preview import montage_png

        imgs = self.G_ema(self.fixed_z.to(self.device), noise_mode="const").float().cpu().numpy()[:, 0]
        return montage_png(imgs, self.run / "previews" / f"iter_{self.iteration:07d}.png")

    def monitor(self) -> dict[str, float]:
        """The shared quality monitor (model/training.py ``QualityMonitor``) on ``monitor_n`` volumes
        of G_ema (constant noise) on the model's grid; keeps the best model in RUN/best."""

        def generate(z: torch.Tensor) -> torch.Tensor:
            return self.G_ema(z.to(self.device), noise_mode="const")

        return self.quality(
            self.iteration, len(self.data), self._volume, generate, self.cfg.to_dict(), self._model_state
        )

    def fit(self) -> Path:
        from model.training import fit_loop

        total = int(self.o["iterations"])
        if distributed.is_main():
            sys.stderr.write(
                f"{self.cfg.family} ({self.cfg.variant}, {'x'.join(map(str, self.cfg.image_shape))}, "
                f"{'2D' if self.cfg.dims == 2 else '3D'}) on {self.device}: iterations {self.iteration}..{total}, "
                f"batch {self.batch}, lr {self.lr}"
                + (f", inflated from {self.init_info['from']}" if self.init_info else "")
                + "\n"
            )
        return fit_loop(self)


def train(options: dict[str, Any], progress: Progress | None = None) -> Path:
    """Train (or resume) a run; returns the finished model directory (RUN/model)."""
    return Trainer(options, progress).fit()

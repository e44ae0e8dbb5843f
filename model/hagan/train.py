"""HA-GAN training (paper section III-B..E), one amortised iteration at a time.

Each iteration draws one sub-volume start r (a multiple of the feature scale, so the real
high-resolution crop and the generated one cover the same slices; ``sub_volumes`` K > 1 draws K starts,
D^H judging each and the encoders taking the first) and runs, as the authors do:

1. D step: D^H on real/generated sub-volumes with r, D^L on real/generated low-resolution whole
   volumes, BCE with logits (+ the auxiliary classifier's cross-entropy for a conditional model).
2. G step: non-saturating BCE against D (+ lambda_class * cross-entropy).
3. E^H step: L1 between the real sub-volume and G^H(E^H(sub-volume)), G frozen.
4. E^G step: L1 on the sub-volume and on the low-resolution volume, reconstructed by the frozen G
   from E^G(E^H features of all slabs); E^H frozen.  With ``lambda_rec`` > 0 this reconstruction
   joins the G step instead, with gradients into G as well (steps 2 and 4 become one).

Adam (0, 0.999), lr 1e-4 for G and the encoders, 4e-4 for D.  Checkpoints are model directories
plus optimizer and RNG state in safetensors/JSON (no pickles), in the layout every family shares
(model/checkpoint.py); ``resume`` continues bit for bit.

``recipe: small-data`` (``RECIPES``) turns on what a few real volumes need, each also an option
of its own: the real volumes augmented afresh every iteration (``augment``, model/data/augment.py),
DiffAugment on every input of D (``diffaug``), an exponential moving average of G that is served
and that the encoders learn to invert (``ema``), G^H normalised with whole-volume GroupNorm
statistics as at inference (``whole_stats``), sub-volumes starting at any slice (``any_start``),
the low-resolution real volume average-pooled instead of nearest-sampled (``lowres``), GroupNorm
groups of at least two channels (``norm_min_group``), and for the encoder a latent reconstruction
term on generated volumes and a prior on its codes (``lambda_latent``, ``lambda_prior``), and G
learning to reconstruct the real volumes from their codes beside fooling D (``lambda_rec``): a GAN's
generator alone, on a few CPU iterations, spends hundreds of them on blobs before any anatomy, while a
reconstruction signal gives it the anatomy of every training volume from the first iterations.
``rec_region: whole`` makes that reconstruction compare G^H's whole volume (not only the iteration's
sub-volume), and ``rec_warmup`` N trains G and the encoders by reconstruction alone for the first N
iterations (D idle) before the GAN starts.
``objective: glo`` trains G alone by generative latent optimisation (Bojanowski et al. 2018) instead of
the game: every training volume has a latent code of its own, learnt with G by the L1 of G's whole
volume and low-resolution volume against it (Adam, ``lr_codes``; the codes' mean square pulled to 1 by
``code_prior``), with Gaussian noise of sd ``code_noise`` added to the codes on their way into G so that
G learns each code's neighbourhood and a code between them still draws a brain; D and the encoders are
idle.  The served G takes z ~ N(0, I) where it took a code: the Gaussian fitted to the codes (mean and
covariance, eigenvalues floored at ``code_floor`` times their mean) is folded into G^A's first layer in
every model directory the run writes (the checkpoint keeps G unfolded and the codes).  Its encoders are
trained afterwards through the frozen G (``init_from`` RUN/model, ``freeze_g: on``).  On the demo data
this drew ventricles, the corpus callosum and the cerebellum where the game drew blobs
(benchmarks/RESULTS.md, "G fitted to every training volume by generative latent optimisation").
``monitor_every`` runs the evaluation's texture distance on a few EMA samples (``monitor``) and keeps
the best model in RUN/best.

Data-parallel under torchrun (model/distributed.py): each rank computes rows [lo, hi) of the global
``batch`` (which the world size must divide) and reads only those volumes; the batch's indices, the
latents, r and the augmentation and DiffAugment parameters are drawn for the whole batch on every rank
from the same seeds, so the iteration is the single-process one at the global batch.  The gradients of
each optimizer group are averaged over the ranks right before its step (``distributed.average_gradients``:
bucketed all_reduce divided by the world size, which is what DistributedDataParallel does; DDP wrappers
do not fit the four steps on overlapping sub-networks with ``requires_grad`` toggled between them).
Every loss is a per-sample mean, so the mean of the ranks' losses is the global batch's.  Rank 0 alone
writes checkpoints, the metrics, previews, the monitor and the model; a checkpoint holds no rank's state
of its own and resumes with any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model import distributed
from model.base import Intensity, Progress
from model.checkpoint import latest_checkpoint, read_training_checkpoint
from model.data.augment import RandomAugment, diff_augment
from model.data.datasets import VolumeDataset
from model.hagan.config import LR_REFUSAL, HAGANConfig
from model.hagan.networks import HAGAN, code_gaussian, fold_code_gaussian, widen_gh_state
from model.training import (
    KEEP_CHECKPOINTS,
    LOOP_DEFAULTS,
    RECIPE_DEFAULTS,
    QualityMonitor,
    recipe_options,
    resume_checkpoint,
    write_checkpoint,
)

DEFAULTS: dict[str, Any] = LOOP_DEFAULTS | {
    "batch": 2,
    "width": 1.0,
    # G^H's hidden width (0: width's).  With init_from a wider G^H than the model's is made from the
    # model's by copying channels (networks.widen_gh_state): it starts drawing what the model drew
    "gh_width": 0.0,
    "latent_dim": 1024,
    "resolution": None,  # default: the dataset's
    "lr_g": 1e-4,
    "lr_d": 4e-4,
    "lr_e": 1e-4,
    "lambda_class": 0.1,
    "amp": "auto",  # mixed precision: auto = bf16 autocast on a CUDA device that supports it; on | off
    # convolution inputs channels-last 3D on large grids and standard on small ones
    # (HAGAN.set_mixed_layout): auto = on the CPU, on | off.  Same values up to float summation order.
    "channels_last": "auto",
    # Adam's fused kernel (one pass over each parameter's state; torch >= 2.4 on CPU and CUDA):
    # auto = on, on | off.  Same update rule; the last bits can differ from the unfused loop.
    "fused_adam": "auto",
    # glibc's allocator (tune_malloc): large blocks from the reusable heap instead of fresh mmaps,
    # which the kernel zero-fills page by page on every use: on | off (default).  Process-wide; no
    # effect on the values.  At 128^3 it saved 0-11% of the time for ~0.2 GiB more peak memory in
    # benchmarks/RESULTS.md, so it is off unless asked for.
    "tune_malloc": "off",
    # ---- the small-data recipe's parts (see RECIPES and the module docstring)
    **RECIPE_DEFAULTS,
    "ema": 0.0,  # EMA decay of G (0: off); ramped up as min(ema, (1 + it) / (10 + it))
    "whole_stats": "off",
    "any_start": "off",
    "lowres": "nearest",  # how the real low-resolution volume is made: nearest (the authors') | average
    "norm_min_group": 1,
    "lambda_latent": 0.0,  # E^G: L1 between z and E(G(z)) for generated volumes
    "lambda_prior": 0.0,  # E^G: its codes' per-sample mean 0 and mean square 1
    # G and E^G trained together to reconstruct the real volume (alpha-GAN / VAE-GAN style): the G step
    # adds lambda_rec * L1 of G(E^G(E^H features)) against the real sub-volume and low-resolution
    # volume, with gradients into G and E^G (0: the authors' encoder, trained through a frozen G)
    "lambda_rec": 0.0,
    # what the reconstruction (lambda_rec, and the E^G step) compares: sub-volume = G^H's sub-volume at the
    # iteration's start plus the low-resolution volume (the authors' E^G loss); whole = G^H's whole volume
    # plus the low-resolution volume, so all of G^H's output is supervised each iteration
    # (benchmarks/probe_g_fit.py: 3x fewer iterations to the same fit)
    "rec_region": "sub-volume",
    # the first N iterations train G and the encoders by reconstruction alone (lambda_rec > 0 needed): D
    # idle, no adversarial term; then the GAN with the reconstruction beside it.  G learns the anatomy
    # from the volumes themselves before D judges it (0: off)
    "rec_warmup": 0,
    # every N iterations, a Gaussian fitted to E^G's codes of the training volumes (mean and covariance, as
    # the ex-post density estimation of regularised autoencoders) is folded into
    # E^G's output layer and G^A's first layer, so the codes of real volumes are standard normal again and
    # a sampled z ~ N(0, I) lands where the real volumes' codes are (0: off)
    "latent_refit": 0,
    # how D's two logits make the adversarial loss: mean-logit = one BCE of the mean of the D^H and D^L
    # logits (the authors'); each = a BCE for each discriminator, averaged.  With mean-logit a fake whose
    # outline D^L finds real (a large D^L logit) leaves G little gradient from D^H, which alone judges
    # the anatomy inside (benchmarks/probe_hagan_d.py)
    "d_loss": "mean-logit",
    # sub-volumes per iteration (the authors': 1): G^H draws K sub-volumes at K random starts and D^H
    # judges each (its losses averaged), so more of G^H's output is trained each iteration at K times
    # the G^H and D^H cost.  Fitted directly, G reached with the whole volume in 300 iterations what one
    # sub-volume of R/8 slices reached in 1000 (benchmarks/probe_g_fit.py, RESULTS.md)
    "sub_volumes": 1,
    "keep_checkpoints": KEEP_CHECKPOINTS,  # the newest K checkpoints are kept (0: all); RUN/best is kept apart
    # a model directory (or a run folder's model/) whose weights start this run: fine-tuning a shipped or
    # earlier model on new data, or going on with a finished model whose training state is gone.  Its
    # architecture (width, latent_dim, norm_min_group, classes) is taken, and must agree with what is given;
    # G (the served weights, live and EMA), the encoders and D are loaded where the directory has them;
    # the optimizers start afresh at iteration 0
    "init_from": None,
    # on: only the encoders (E^H, E^G) train, through the frozen G, as the authors' encoder steps; G and D
    # keep their weights (the served G is unchanged), D and the quality monitor (which scores G) are idle.
    # Fitting a model's encoder to new scans, or to a wider range of them, without touching its samples
    "freeze_g": "off",
    # gan (the authors' game) | glo: G alone, fitted with a latent code per training volume (module docstring)
    "objective": "gan",
    "code_noise": 0.0,  # glo: sd of the Gaussian noise added to the codes on their way into G
    "lr_codes": 1e-2,  # glo: Adam's learning rate of the codes
    "code_prior": 1e-3,  # glo: weight of the pull of the codes' mean square to 1
    "code_floor": 0.01,  # glo: the served Gaussian's eigenvalues floored at this fraction of their mean
}
_ARCH = ("width", "latent_dim", "norm_min_group")  # what init_from takes from its model directory

RECIPES: dict[str, dict[str, Any]] = {
    "authors": {},
    "small-data": {
        "augment": "on",
        "diffaug": "on",
        "ema": 0.999,
        "whole_stats": "on",
        "any_start": "on",
        "lowres": "average",
        "norm_min_group": 2,
        "lambda_latent": 1.0,
        "lambda_prior": 0.1,
        "monitor_every": 100,
    },
}
# in config.training beside the recipe's parts
_RECORDED = (
    "lambda_rec",
    "rec_region",
    "rec_warmup",
    "latent_refit",
    "d_loss",
    "sub_volumes",
    "width",
    "latent_dim",
    "batch",
    "freeze_g",
    "objective",
    "code_noise",
    "lr_codes",
    "code_prior",
    "code_floor",
)
_SWITCHES = ("whole_stats", "any_start", "freeze_g")  # (augment and diffaug: recipe_options checks them)
LATENT_FLOOR = 0.1  # refit_latent: the covariance's eigenvalues floored at this fraction of their mean

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep blocks up to ``mmap_threshold`` bytes on glibc's heap and keep up to ``trim_threshold``
    bytes of freed heap mapped, so each iteration's activations reuse memory that is already paged
    in.  By default glibc maps every block above 32 MiB afresh and unmaps it on free, and every
    use of such a block costs page faults.  Returns False (and changes nothing) where the C library
    is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def use_channels_last(option: str, device: torch.device) -> bool:
    if option not in ("auto", "on", "off"):
        raise ValueError(f"channels_last must be auto, on or off, got {option!r}")
    return option == "on" or (option == "auto" and device.type == "cpu")


def use_fused_adam(option: str, device: torch.device) -> bool:
    if option not in ("auto", "on", "off"):
        raise ValueError(f"fused_adam must be auto, on or off, got {option!r}")
    return option != "off" and device.type in ("cpu", "cuda")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp``: bf16 (no loss scaling needed, fp32 range) or None (fp32).

    "auto" turns it on only on CUDA devices with bf16 support; "on" also allows the CPU's bf16
    autocast (slower on most CPUs; useful to check the code path); "off" is plain fp32."""
    if amp not in ("auto", "on", "off"):
        raise ValueError(f"amp must be auto, on or off, got {amp!r}")
    if amp == "off":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if amp == "on":
            raise ValueError("--amp on: this CUDA device has no bf16 support; use --amp off")
        return None
    return torch.bfloat16 if amp == "on" else None


def warn_emulated_bf16() -> bool:
    """On stderr, where the CPU has no bf16 arithmetic of its own (no avx512_bf16 or AMX), that ``--amp
    on`` runs emulated there: one iteration at 128^3, width 0.25, batch 1 took 66 s against 1.3 s in fp32
    on a 2-core AVX2 EPYC (benchmarks/RESULTS.md).  Returns whether it warned."""
    from model.precision import cpu_has_bf16

    if cpu_has_bf16():
        return False
    sys.stderr.write(
        "warning: --amp on: this CPU has no native bf16 (no avx512_bf16 or AMX flags), so bf16 autocast is "
        "emulated: measured about 50x slower than fp32 per iteration on an AVX2 CPU; --amp off is faster here\n"
    )
    return True


OPTIMIZERS = {"g": ("ga", "gl", "gh"), "d": ("dh", "dl"), "eh": ("eh",), "eg": ("eg",)}


def _lr(options: dict[str, Any], group: str) -> float:
    """The learning rate of an optimizer group (g, d, eh, eg) from the options."""
    if group == "codes":
        return float(options["lr_codes"])
    return float(options["lr_d" if group == "d" else ("lr_g" if group == "g" else "lr_e")])


def _params(net: HAGAN, names: tuple[str, ...]) -> list[torch.nn.Parameter]:
    return [p for n in names for p in getattr(net, n).parameters()]


def _requires_grad(net: HAGAN, names: tuple[str, ...], flag: bool) -> None:
    for p in _params(net, names):
        p.requires_grad_(flag)


class Trainer:
    def __init__(self, options: dict[str, Any], progress: Progress | None = None) -> None:
        from model.registry import resolve_device

        if options.get("lr") is not None:  # silently ignored before: HA-GAN has no single learning rate
            raise ValueError(LR_REFUSAL)  # (model/hagan/config.py)
        self.o = recipe_options(DEFAULTS, RECIPES, {k: v for k, v in options.items() if v is not None})
        for k in _SWITCHES:
            if self.o[k] not in ("on", "off"):
                raise ValueError(f"{k} must be on or off, got {self.o[k]!r}")
        if self.o["d_loss"] not in ("mean-logit", "each"):
            raise ValueError(f"d_loss must be mean-logit or each, got {self.o['d_loss']!r}")
        for k, least in (("sub_volumes", 1), ("latent_refit", 0), ("rec_warmup", 0)):
            v = self.o[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{k} must be an integer >= {least}, got {v!r}")
        if self.o["rec_region"] not in ("sub-volume", "whole"):
            raise ValueError(f"rec_region must be sub-volume or whole, got {self.o['rec_region']!r}")
        if self.o["rec_warmup"] and not float(self.o["lambda_rec"]):
            raise ValueError("rec_warmup trains G by reconstruction alone: it needs lambda_rec > 0")
        if self.o["lowres"] not in ("nearest", "average"):
            raise ValueError(f"lowres must be nearest or average, got {self.o['lowres']!r}")
        if not 0.0 <= float(self.o["ema"]) < 1.0:
            raise ValueError(f"ema must be a decay in [0, 1), got {self.o['ema']!r}")
        self.glo = self._check_glo({k: v for k, v in options.items() if v is not None})
        if self.o["freeze_g"] == "on":
            if not self.o["init_from"]:
                raise ValueError("freeze_g trains the encoders of a trained G: it needs init_from (a model directory)")
            self.o["monitor_every"] = 0  # the monitor scores G's samples, which do not change
        self.run = Path(self.o["output"])
        self.data = VolumeDataset(self.o["data"])
        if len(self.data) == 0:
            raise ValueError(f"{self.o['data']}: the dataset is empty")
        self.device = resolve_device(self.o["device"])
        self.progress = progress
        self.widen_gh = False  # init_from: the model's G^H widened to gh_width (_init_source)
        init = self._init_source({k: v for k, v in options.items() if v is not None}) if self.o["init_from"] else None
        self.rows = distributed.part(int(self.o["batch"]))  # this rank's rows of the global batch
        res = int(self.o["resolution"] or self.data.resolution)
        if res != self.data.resolution:
            raise ValueError(f"the dataset was prepared at {self.data.resolution}^3, not {res}^3")
        mf = self.data.manifest
        spacing = self.data.grid_spacing()
        self.cfg = HAGANConfig(
            resolution=res,
            latent_dim=int(self.o["latent_dim"]),
            width=float(self.o["width"]),
            class_names=list(self.data.class_names),
            modality=mf["modality"],
            intensity=Intensity(**mf["intensity"]),
            spacing=spacing or (1.0, 1.0, 1.0),
            description=f"HA-GAN trained by voxgen train on {mf.get('source', '?')}",
            norm_min_group=int(self.o["norm_min_group"]),
            gh_width=0.0 if float(self.o["gh_width"]) == float(self.o["width"]) else float(self.o["gh_width"]),
            preprocess=dict(mf.get("preprocess") or {}),
            training={k: self.o[k] for k in ("recipe", *RECIPES["small-data"], *_RECORDED)},
        )
        if self.glo:
            self.cfg.description += " (G by generative latent optimisation: its encoders are not trained)"
        if self.cfg.preprocess.get("mode") == "physical":
            self.cfg.spacing = tuple(float(v) for v in self.cfg.preprocess["spacing"])  # type: ignore[assignment]
        torch.manual_seed(int(self.o["seed"]))
        self.net = HAGAN(self.cfg)
        self.init_parts: list[str] = []
        if init is not None:
            self.cfg.training["init_from"] = init[0].name if init[0].name != "model" else init[0].parent.name
            self.cfg.description += f", initialised from the model {self.cfg.training['init_from']}"
            if not self.o["resume"]:  # a resumed run has its own weights
                self.init_parts = self._load_init(init[0])
        self.net = self.net.to(self.device).train()
        self.channels_last = use_channels_last(str(self.o["channels_last"]), self.device)
        self.net.set_mixed_layout(self.channels_last)
        # E^G step: slabs through E^H per call; one slab of every volume, as the authors' loop (all at
        # once is no faster on the CPU and its intermediates add ~0.7 GiB at 256^3, batch 2)
        self.slabs_per_call: int | None = self.rows[1] - self.rows[0]
        self.amp_dtype = amp_dtype(str(self.o["amp"]), self.device)
        if self.amp_dtype is not None and self.device.type == "cpu" and distributed.is_main():
            warn_emulated_bf16()
        fused = use_fused_adam(str(self.o["fused_adam"]), self.device)
        if str(self.o["tune_malloc"]) not in ("on", "off"):
            raise ValueError(f"tune_malloc must be on or off, got {self.o['tune_malloc']!r}")
        self.malloc_tuned = self.o["tune_malloc"] == "on" and tune_malloc()
        self.opts = {
            k: torch.optim.Adam(
                _params(self.net, v),
                lr=_lr(self.o, k),
                betas=(0.0, 0.999),
                eps=1e-8,
                fused=fused or None,
            )
            for k, v in OPTIMIZERS.items()
        }
        self.codes: torch.Tensor | None = None  # glo: a latent per training volume, learnt with G
        if self.glo:
            g0 = torch.Generator().manual_seed(int(self.o["seed"]) + 5)
            self.codes = torch.randn(len(self.data), self.cfg.latent_dim, generator=g0).to(self.device)
            self.codes.requires_grad_(True)
            self.opts["codes"] = torch.optim.Adam(
                [self.codes], lr=_lr(self.o, "codes"), betas=(0.0, 0.999), eps=1e-8, fused=fused or None
            )
        self.gen = torch.Generator().manual_seed(int(self.o["seed"]) + 1)  # latents (CPU: same on any device)
        self.rng = np.random.default_rng(int(self.o["seed"]) + 2)  # batches and r
        self.iteration = 0
        self.fixed_z = torch.randn(4, self.cfg.latent_dim, generator=torch.Generator().manual_seed(1234))
        self.aug_gen = torch.Generator().manual_seed(int(self.o["seed"]) + 3)  # augmentations (CPU)
        self.augment = RandomAugment() if self.o["augment"] == "on" else None
        self.ema: HAGAN | None = None
        if float(self.o["ema"]) > 0:
            self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.quality = QualityMonitor(self.run, (res,) * 3, int(self.o["monitor_n"]), self.cfg.latent_dim)
        if self.o["resume"]:
            self._load_latest()
        distributed.broadcast_module(self.net)
        if self.ema is not None:
            distributed.broadcast_module(self.ema)

    def _check_glo(self, given: dict[str, Any]) -> bool:
        """Check the options of ``objective`` (glo: G alone, fitted with a code per volume); the
        recipe's on-the-fly augmentation is turned off for glo (a volume's code stands for the volume as
        prepared; augmenting it afresh each iteration would teach G the blurred mean), and asking for it
        is refused."""
        o = self.o
        if o["objective"] not in ("gan", "glo"):
            raise ValueError(f"objective must be gan or glo, got {o['objective']!r}")
        for k in ("code_noise", "lr_codes", "code_prior", "code_floor"):
            v = o[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{k} must be a number >= 0, got {v!r}")
        if o["objective"] != "glo":
            return False
        clash = [
            f"{k} {o[k]}"
            for k, ok in (
                ("freeze_g", "off"),
                ("latent_refit", 0),
                ("init_from", None),
                ("augment", "off"),
                ("lambda_rec", 0),
                ("rec_warmup", 0),
            )
            if k in given and given[k] != ok
        ]
        if clash:
            raise ValueError(
                "objective glo fits G from scratch, a code per training volume as prepared (D and the encoders "
                f"idle): it cannot take {', '.join(clash)}; train the encoders afterwards with --init-from "
                "RUN/model --freeze-g on"
            )
        o["augment"] = "off"
        o["lambda_rec"] = 0.0
        return True

    # ------------------------------------------------------------------ init_from
    def _init_source(self, given: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        """The model directory named by ``init_from`` and its config, checked against the dataset and
        the options; its architecture (``_ARCH``) goes into the options."""
        from model.checkpoint import ModelDirError, find_model_dir, read_config

        src = find_model_dir(self.o["init_from"])
        try:
            c = read_config(src)
        except ModelDirError as e:
            raise ValueError(f"--init-from: {e}") from e
        name = src.name if src.name != "model" else src.parent.name
        if c.get("family") != "hagan":
            raise ValueError(f"--init-from {name}: a {c.get('family')} model; this run trains hagan")
        mf = self.data.manifest
        checks = (
            ("resolution", c.get("resolution"), self.data.resolution),
            ("modality", c.get("modality"), mf["modality"]),
            ("classes", list(c.get("class_names") or []), list(self.data.class_names)),
            ("preprocessing", _prep_key(c.get("preprocess")), _prep_key(mf.get("preprocess"))),
        )
        for what, model_v, data_v in checks:
            if model_v != data_v:
                raise ValueError(f"--init-from {name}: the model's {what} is {model_v}, the dataset's {data_v}")
        for k in _ARCH:
            v = c.get(k, DEFAULTS[k])  # (an older config without norm_min_group: 1, the default)
            if k in given and given[k] != v:
                raise ValueError(f"--init-from {name}: the model has {k} {v}, not {given[k]} as asked")
            self.o[k] = v
        model_gh = float(c.get("gh_width") or c.get("width", 1.0))
        asked_gh = float(given.get("gh_width") or 0.0) or model_gh
        if asked_gh < model_gh:
            raise ValueError(
                f"--init-from {name}: the model's G^H has width {model_gh}; it can be widened, not narrowed"
            )
        self.o["gh_width"] = asked_gh  # (the config stores one equal to width as 0)
        self.widen_gh = asked_gh > model_gh
        return src, c

    def _load_init(self, src: Path) -> list[str]:
        """Load the weights of the model directory ``src`` into the (CPU) network; returns the top-level
        parts loaded.  G must be there; encoders and D stay as initialised where the directory has none."""
        from model.checkpoint import ModelDirError, read_weights

        try:
            sd = read_weights(src)
        except ModelDirError as e:
            raise ValueError(f"--init-from: {e}") from e
        own = self.net.state_dict()
        if self.widen_gh:
            try:
                sd = widen_gh_state(sd, self.net.gh.norms[0].num_channels, int(self.o["norm_min_group"]))
            except ValueError as e:
                raise ValueError(f"--init-from {src.name}: {e}") from e
        unknown = sorted(set(sd) - set(own))
        if unknown:
            raise ValueError(f"--init-from {src.name}: weights this network does not have: {', '.join(unknown[:5])}")
        for k, v in sd.items():
            if v.shape != own[k].shape:
                raise ValueError(
                    f"--init-from {src.name}: {k} is {tuple(v.shape)}, this network's {tuple(own[k].shape)}"
                )
        parts = sorted({k.split(".", 1)[0] for k in sd})
        missing_g = [p for p in OPTIMIZERS["g"] if any(k.startswith(p + ".") for k in own) and p not in parts]
        if missing_g:
            raise ValueError(f"--init-from {src.name}: no weights for G's {', '.join(missing_g)}")
        self.net.load_state_dict(own | sd)
        return parts

    # ------------------------------------------------------------------ one iteration
    def _part(self) -> tuple[int, int, int] | None:
        """(global batch, lo, hi) of this rank's rows in a distributed run; None in one process."""
        lo, hi = self.rows
        n = int(self.o["batch"])
        return None if (lo, hi) == (0, n) else (n, lo, hi)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = self.rng.integers(0, len(self.data), size=int(self.o["batch"]))
        idx = idx[self.rows[0] : self.rows[1]]  # this rank's shard: only its volumes are read
        x = torch.from_numpy(np.stack([np.asarray(self.data.volume(int(i)), np.float32) for i in idx]))[:, None]
        labels = None
        if self.cfg.num_classes:
            labels = torch.tensor([self.data.label(int(i)) or 0 for i in idx], device=self.device)
        return x.to(self.device), labels

    def _ac(self) -> Any:
        """Autocast for the forward passes (backward runs outside, as PyTorch recommends)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _update(self, group: str) -> None:
        """One optimizer step (on the gradients averaged over the ranks in a distributed run); the
        gradients are freed at once, so no step holds another group's."""
        distributed.average_gradients(_params(self.net, OPTIMIZERS[group]))
        self.opts[group].step()
        self.opts[group].zero_grad(set_to_none=True)

    def step(self) -> dict[str, float]:
        if self.glo:
            return self._glo_step()
        net, ac = self.net, self._ac

        def bce(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(logit.float(), target)

        def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.l1_loss(a.float(), b.float())

        def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.float(), labels)

        part = self._part()
        x, labels = self._batch()
        if self.augment is not None:
            x = self.augment(x, self.aug_gen, rows=part)
        b = x.shape[0]
        s, depth = net.feat_scale, net.sub_depth
        rs = []
        for _ in range(int(self.o["sub_volumes"])):
            if self.o["any_start"] == "on":
                rs.append(int(self.rng.integers(0, self.cfg.resolution - depth + 1)))
            else:
                rs.append(int(self.rng.integers(0, (self.cfg.resolution - depth) // s + 1)) * s)
        r = rs[0]  # the encoders' sub-volume
        crops = [x[:, :, q : q + depth] for q in rs]
        x_crop = crops[0]
        if self.o["lowres"] == "average":
            x_low = F.avg_pool3d(x, s)
        else:
            x_low = F.interpolate(x, scale_factor=1 / s)  # nearest, as the authors' code
        ws = self.o["whole_stats"] == "on"
        gen = self.ema if self.ema is not None else net  # the G the encoders learn to invert
        ones, zeros = torch.ones(b, 1, device=self.device), torch.zeros(b, 1, device=self.device)
        losses: dict[str, float] = {}

        def z() -> torch.Tensor:
            if part is None:
                return torch.randn(b, self.cfg.latent_dim, generator=self.gen).to(self.device)
            g = torch.randn(part[0], self.cfg.latent_dim, generator=self.gen)  # the global batch's
            return g[part[1] : part[2]].to(self.device)

        def d_of(his: list[torch.Tensor], lo: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            """D's logits on the sub-volumes ``his`` (at the starts ``rs``) and the low-resolution volume:
            one per sub-volume (the mean of its D^H logit and D^L's, the authors'), or with ``d_loss:
            each`` D^H's and D^L's apart; and the class logits."""
            if self.o["diffaug"] == "on":  # depth stays put in the sub-volume: D^H is told where it starts
                his = [diff_augment(hi, self.aug_gen, axes=(3, 4), rows=part) for hi in his]
                lo = diff_augment(lo, self.aug_gen, rows=part)
            hs = [net.dh(hi, q) for hi, q in zip(his, rs, strict=True)]
            lo_logit, l_cls = net.dl(lo)
            h_cls = None if hs[0][1] is None else sum(c for _, c in hs) / len(hs)
            cls = None if h_cls is None else (h_cls + l_cls) / 2.0
            if self.o["d_loss"] == "each":
                return [torch.cat([h for h, _ in hs]), lo_logit], cls
            return [torch.cat([(h + lo_logit) / 2.0 for h, _ in hs])], cls

        def adv(logits: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
            # a logit per sub-volume and sample (sub_volumes > 1: the crops' logits one after another)
            return sum(bce(t, target.repeat(t.shape[0] // target.shape[0], 1)) for t in logits) / len(logits)  # type: ignore[return-value]

        warmup = self.iteration < int(self.o["rec_warmup"])  # reconstruction alone: no D, no adversarial term
        frozen = self.o["freeze_g"] == "on"  # the encoders alone (steps 3 and 4), through the frozen G

        def rec_loss(g: HAGAN, z_e: torch.Tensor) -> torch.Tensor:
            """L1 of G(z_e) against the real volume: G^H's sub-volume at r (or its whole volume with
            ``rec_region: whole``) and G^L's low-resolution volume, averaged."""
            if self.o["rec_region"] == "whole":
                f = g.features(z_e, labels)
                rec_hi, rec_lo = g.gh(f), g.gl(f)
                return (l1(rec_hi, x) + l1(rec_lo, x_low)) / 2
            rec_hi, rec_lo = g.generate_train(z_e, r, labels, ws)
            return (l1(rec_hi, x_crop) + l1(rec_lo, x_low)) / 2

        # 1. D
        if not warmup and not frozen:
            _requires_grad(net, OPTIMIZERS["d"], True)
            self.opts["d"].zero_grad(set_to_none=True)
            with ac():
                logit, cls = d_of(crops, x_low)
                d_real = adv(logit, ones) + (ce(cls, labels) if cls is not None else 0.0)
                with torch.no_grad():
                    fake_hi, fake_lo = net.generate_train_crops(z(), rs, labels, ws)
                logit, _ = d_of(fake_hi, fake_lo)
                d_fake = adv(logit, zeros)
            (d_real + d_fake).backward()
            self._update("d")
            losses["d_real"], losses["d_fake"] = float(d_real.detach()), float(d_fake.detach())

        def eg_terms(z_e: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
            """E^G's loss: the reconstruction, its codes' prior and the latent term on generated volumes."""
            loss = rec
            if self.o["lambda_prior"]:
                ze = z_e.float()
                prior = (ze.mean(1) ** 2 + (ze.square().mean(1) - 1) ** 2).mean()
                loss = loss + float(self.o["lambda_prior"]) * prior
                losses["e_prior"] = float(prior.detach())
            if self.o["lambda_latent"]:
                with torch.no_grad():
                    zf = z()
                    fake = gen.gh(gen.features(zf, labels))  # whole volumes, as a user would encode them
                    ffeats = net.encode_features(fake, self.slabs_per_call, self.channels_last)
                    del fake
                lat = (net.eg(ffeats).float() - zf).abs().mean()
                loss = loss + float(self.o["lambda_latent"]) * lat
                losses["e_latent"] = float(lat.detach())
            return loss

        joint = 0.0 if frozen else float(self.o["lambda_rec"])
        feats = None
        if joint:  # E^H features of every slab, for the reconstruction in the G step
            with torch.no_grad(), ac():
                feats = net.encode_features(x, self.slabs_per_call, self.channels_last)

        # 2. G (with lambda_rec: and E^G, on the reconstruction of the real volume too)
        _requires_grad(net, OPTIMIZERS["d"], False)
        if not frozen:
            self.opts["g"].zero_grad(set_to_none=True)
            with ac():
                g_loss = torch.zeros((), device=self.device)
                if not warmup:
                    fake_hi, fake_lo = net.generate_train_crops(z(), rs, labels, ws)
                    logit, cls = d_of(fake_hi, fake_lo)
                    g_loss = adv(logit, ones)
                    if cls is not None:
                        g_loss = g_loss + self.o["lambda_class"] * ce(cls, labels)
                    del fake_hi, fake_lo
                total = g_loss
                if feats is not None:
                    self.opts["eg"].zero_grad(set_to_none=True)
                    z_e = net.eg(feats)
                    rec = rec_loss(net, z_e)
                    losses["e_g"] = float(rec.detach())
                    total = total + joint * eg_terms(z_e, rec)
            total.backward()
            self._update("g")
            if feats is not None:
                self._update("eg")
            self._ema_update()
            if not warmup:
                losses["g"] = float(g_loss.detach())
            del total

        # 3. E^H: reconstruct the real sub-volume through the frozen G^H
        _requires_grad(net, OPTIMIZERS["g"], False)
        self.opts["eh"].zero_grad(set_to_none=True)
        with ac():
            e_loss = l1(gen.gh(net.eh(x_crop)), x_crop)
        e_loss.backward()
        self._update("eh")
        losses["e_h"] = float(e_loss.detach())

        # 4. E^G: through the frozen G, from the E^H features of every slab (done in step 2 when joint)
        if feats is None:
            with torch.no_grad(), ac():
                feats = net.encode_features(x, self.slabs_per_call, self.channels_last)
            self.opts["eg"].zero_grad(set_to_none=True)
            with ac():
                z_e = net.eg(feats)
                rec = rec_loss(gen, z_e)
                losses["e_g"] = float(rec.detach())
                eg_loss = eg_terms(z_e, rec)
            eg_loss.backward()
            self._update("eg")
        _requires_grad(net, OPTIMIZERS["g"], True)
        self.iteration += 1
        every = int(self.o["latent_refit"])
        if every and self.iteration % every == 0:
            losses |= self.refit_latent()
        return distributed.average_scalars(losses)

    def _glo_step(self) -> dict[str, float]:
        """One GLO iteration: ``batch`` volumes drawn without replacement, their codes (plus
        ``code_noise``) through G, the L1 of G^H's whole volume and G^L's low-resolution volume against
        them, and one Adam step of G and of the codes."""
        net, codes = self.net, self.codes
        assert codes is not None
        n, b = len(self.data), int(self.o["batch"])
        idx = self.rng.choice(n, b, replace=False) if b <= n else self.rng.integers(0, n, size=b)
        lo, hi = self.rows
        noise = torch.randn(b, self.cfg.latent_dim, generator=self.gen)[lo:hi].to(self.device)
        idx = idx[lo:hi]
        x = torch.from_numpy(np.stack([np.asarray(self.data.volume(int(i)), np.float32) for i in idx]))[:, None]
        x = x.to(self.device)
        labels = None
        if self.cfg.num_classes:
            labels = torch.tensor([self.data.label(int(i)) or 0 for i in idx], device=self.device)
        s = net.feat_scale
        x_low = F.avg_pool3d(x, s) if self.o["lowres"] == "average" else F.interpolate(x, scale_factor=1 / s)
        zb = codes[torch.as_tensor(idx, device=self.device)]
        with self._ac():
            f = net.features(zb + float(self.o["code_noise"]) * noise, labels)
            rec = (F.l1_loss(net.gh(f).float(), x) + F.l1_loss(net.gl(f).float(), x_low)) / 2
        prior = (zb.square().mean(1) - 1).square().mean()
        (rec + float(self.o["code_prior"]) * prior).backward()
        self._update("g")
        distributed.average_gradients([codes])
        self.opts["codes"].step()
        self.opts["codes"].zero_grad(set_to_none=True)
        self._ema_update()
        self.iteration += 1
        return distributed.average_scalars({"rec": float(rec.detach()), "code_prior": float(prior.detach())})

    def _glo_folded(self, g: HAGAN) -> HAGAN:
        """A copy of ``g`` whose G^A takes z ~ N(0, I) where it took a code: the Gaussian fitted to the
        codes (``code_gaussian``, eigenvalues floored at ``code_floor`` of their mean) folded into its
        first layer, what a glo run serves."""
        assert self.codes is not None
        mean, root, _, _ = code_gaussian(self.codes.detach().double().cpu(), float(self.o["code_floor"]))
        out = copy.deepcopy(g)
        fold_code_gaussian(out.ga.fc, mean.to(self.device), root.to(self.device))
        return out

    def _served_g(self) -> HAGAN:
        """The G a model directory of this run serves (the EMA where there is one; glo: folded)."""
        g = self.ema if self.ema is not None else self.net
        return self._glo_folded(g) if self.glo else g

    @torch.no_grad()
    def refit_latent(self) -> dict[str, float]:
        """Re-standardise the code space: E^G's codes c of every training volume (as prepared, not
        augmented) get a mean m and covariance S = V diag(lam) V^T, whose eigenvalues are floored at
        ``LATENT_FLOOR`` times their mean (a few dozen volumes span only some of the latent's
        dimensions), and the affine map c = m + L z, L = S^(1/2), is folded into the networks without
        changing what they compute: E^G's output layer then gives z = L^-1 (c - m), and G^A's first layer
        (live and EMA) takes z where it took c.  A reconstruction G(E(x)) is unchanged; the real
        volumes' codes have mean 0 and covariance I (up to the floor); a sampled z ~ N(0, I) stands for a
        code drawn from the Gaussian fitted to the real volumes' codes, correlations included.  The Adam
        state of the two folded layers starts afresh.  Returns the codes' spread before the fit
        (``latent_mean_norm``: |m|, ``latent_std``: the square root of the largest eigenvalue)."""
        net = self.net
        was = net.training
        net.eval()
        codes = []
        for i in range(len(self.data)):
            x = torch.from_numpy(np.asarray(self.data.volume(i), np.float32))[None, None].to(self.device)
            with self._ac():
                codes.append(net.eg(net.encode_features(x, None, self.channels_last)).double())
        net.train(was)
        m, root, inv, lam = code_gaussian(torch.cat(codes), LATENT_FLOOR)  # c = m + L z, L = S^(1/2)
        out = net.eg.out  # conv with one output channel per latent dimension: c = W x + b
        w = out.weight.double()
        out.weight.copy_((inv @ w.flatten(1)).view_as(w))
        out.bias.copy_(inv @ (out.bias.double() - m))
        for g in (net, self.ema) if self.ema is not None else (net,):
            fold_code_gaussian(g.ga.fc, m, root)
        for group, params in (("g", (net.ga.fc.weight, net.ga.fc.bias)), ("eg", (out.weight, out.bias))):
            for prm in params:
                self.opts[group].state.pop(prm, None)
        return {"latent_mean_norm": float(m.norm()), "latent_std": float(lam.max().sqrt())}

    def _ema_update(self) -> None:
        """EMA of G's weights (G^A, G^L, G^H), decay ramped up as min(ema, (1 + it) / (10 + it)); a run
        started from a model (``init_from``) has its EMA there already and takes the full decay at once."""
        if self.ema is None:
            return
        decay = float(self.o["ema"])
        if not self.o["init_from"]:
            decay = min(decay, (1 + self.iteration) / (10 + self.iteration))
        with torch.no_grad():
            for name in OPTIMIZERS["g"]:
                pairs = zip(getattr(self.ema, name).parameters(), getattr(self.net, name).parameters(), strict=True)
                for pe, p in pairs:
                    pe.lerp_(p, 1.0 - decay)

    def served_state(self) -> dict[str, torch.Tensor]:
        """The weights a model directory holds: G from the EMA when there is one, the rest live."""
        sd = self.net.state_dict()
        if self.ema is not None or self.glo:
            esd = self._served_g().state_dict()
            sd = {k: (esd[k] if k.split(".")[0] in OPTIMIZERS["g"] else v) for k, v in sd.items()}
        return sd

    # ------------------------------------------------------------------ quality monitor
    def monitor(self) -> dict[str, float]:
        """The shared quality monitor (model/training.py ``QualityMonitor``) on ``monitor_n`` volumes
        of the served G (the EMA where there is one), on the model's native grid; keeps RUN/best."""
        g = self._served_g()

        def generate(z: torch.Tensor) -> torch.Tensor:
            z = z.to(self.device)
            labels = torch.zeros(len(z), dtype=torch.long, device=self.device) if self.cfg.num_classes else None
            return g.gh(g.features(z, labels))

        g.eval()
        try:
            return self.quality(
                self.iteration, len(self.data), self.data.volume, generate, self.cfg.to_dict(), self.served_state
            )
        finally:
            g.train()

    # ------------------------------------------------------------------ checkpoints
    def generators(self) -> dict[str, torch.Generator]:
        """The CPU generators a checkpoint keeps (``rng.<name>``)."""
        return {"latents": self.gen, "augment": self.aug_gen}

    def save_checkpoint(self) -> Path:
        live = {}  # the served G is the EMA (glo: folded); the live G goes with the training state
        if self.ema is not None or self.glo:
            live = {f"live.{k}": v for k, v in self.net.state_dict().items() if k.split(".")[0] in OPTIMIZERS["g"]}
        if self.glo:
            assert self.codes is not None
            live["glo.codes"] = self.codes.detach()
            if self.ema is not None:
                esd = self.ema.state_dict()
                live |= {f"glo.ema.{k}": esd[k] for k in esd if k.split(".")[0] in OPTIMIZERS["g"]}
        return write_checkpoint(self, self.served_state(), extra=live, state={"best": self.quality.best})

    def _load_latest(self) -> None:
        ck = read_training_checkpoint(latest_checkpoint(self.run))
        served, live = ck.weights(), ck.extra("live.")
        if self.glo:
            codes, ema = ck.extra("glo.codes"), ck.extra("glo.ema.")
            if not codes or not live:
                raise ValueError(f"{ck.path}: this run trains with objective glo but the checkpoint has no codes")
            assert self.codes is not None
            with torch.no_grad():
                self.codes.copy_(next(iter(codes.values())).to(self.device))
            served = served | ema  # G unfolded (the EMA's where there is one), D and the encoders as served
        elif ck.extra("glo.codes"):
            raise ValueError(f"{ck.path}: this run was trained with objective glo; resume it with objective glo")
        if self.ema is not None:
            self.ema.load_state_dict(served)
            if not live:
                raise ValueError(f"{ck.path}: this run trains with an EMA of G but the checkpoint has no live G")
        self.net.load_state_dict(served | live)
        self.quality.best = ck.state.get("best")
        resume_checkpoint(self, ck)
        for k, opt in self.opts.items():  # the learning rates asked for now (the same unless changed)
            for group in opt.param_groups:
                group["lr"] = _lr(self.o, k)

    # ------------------------------------------------------------------ previews and the loop
    @torch.no_grad()
    def preview(self) -> Path:
        from model.preview import montage_png

        g = self._served_g()
        g.eval()
        z = self.fixed_z.to(self.device)
        labels = torch.zeros(len(z), dtype=torch.long, device=self.device) if self.cfg.num_classes else None
        vols = g.gh(g.features(z, labels)).float().cpu().numpy()[:, 0]
        g.train()
        return montage_png(vols, self.run / "previews" / f"iter_{self.iteration:07d}.png")

    def fit(self) -> Path:
        from model.training import fit_loop

        return fit_loop(self)


def _prep_key(p: dict[str, Any] | None) -> str:
    """A preprocessing record as init_from compares it: the mode and, in physical units, the spacing."""
    p = p or {}
    if p.get("mode") == "physical":
        return f"physical at {[float(v) for v in p.get('spacing', [])]} mm"
    return str(p.get("mode") or "stretch")


def train(options: dict[str, Any], progress: Progress | None = None) -> Path:
    """Train (or resume) a run; returns the finished model directory (RUN/model)."""
    return Trainer(options, progress).fit()

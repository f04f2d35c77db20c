"""Every setting of ebdiff as validated dataclasses: load YAML, apply dotted overrides, dump.

A config is a tree of dataclasses. `load_config(path, overrides)` reads a YAML file whose top-level
keys are the section names, applies `section.key=value` overrides (values parsed as YAML scalars)
and validates every key and type. Unknown keys and wrong types raise `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError


@dataclass
class ModelConfig:
    preset: str = "tiny"  # cifar10 | celeba64 | lsun256 | fmnist | tiny | ldm-imagenet256 | ldm-tiny (latent)
    dropout: float = 0.1
    num_classes: int | None = None  # class-conditional on that many classes; None = the preset's (pixel: unconditional)
    class_dropout: float = 0.0  # fraction of training labels replaced by the null class (classifier-free guidance)
    autoencoder: str | None = None  # latent presets: a local diffusers VQModel / AutoencoderKL folder
    latent_scale: Union[float, str] = "auto"  # auto (VQ: 1.0, KL: its scaling_factor) | std (1 / std of the latents) | a number
    # your own architecture instead of the preset's: a diffusers config.json (UNet2DModel, UNet2DConditionModel,
    # DiTTransformer2DModel), a folder holding one, or the mapping itself. Read when the config is loaded and
    # recorded as the mapping (config.yaml), so a run never needs the file again
    config: Union[str, dict, None] = None
    pretrained: str | None = None  # a local diffusers model folder (config.json + safetensors): the starting weights


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # fashion-mnist | cifar10 | celeba | lsun | imagefolder | hf
    root: str | None = None  # where the dataset lives; None = the dataset's default places
    split: str = "train"
    image_size: int | None = None  # None = the preset's resolution
    resize: str = "pad"  # fashion-mnist 28->32: pad | resize
    hflip: bool | None = None  # None = dataset default (on for cifar10/celeba/lsun, off for fashion-mnist)
    lsun_category: str = "church_outdoor"
    limit: int | None = None  # use only the first N images (tests, quick studies)
    num_workers: int = 2  # for datasets streamed from image files
    cache_dir: str | None = None  # decoded-image cache for JPEG datasets; None = ~/.cache/ebdiff
    download: bool = True  # fashion-mnist only: try a torchvision download when it is nowhere on disk
    bad_images: str = "error"  # an unreadable image file: error (one line naming it) | skip (left out, counted)
    latent_cache: str | None = None  # latent presets: where encoded latents are cached; None = ~/.cache/ebdiff/latents
    latent_shard_size: int = 10_000  # latents per cache shard (float16 files read through memory maps)
    image_column: str = "image"  # data.name=hf: the dataset's Image column
    label_column: str | None = None  # data.name=hf: its class column (ClassLabel or integers), if any


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    beta_schedule: str = "linear"  # linear | cosine | scaled_linear (LDM's: linspace of sqrt(beta), squared)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "epsilon"
    loss_reduction: str = "mean"  # mean (diffusers) | sum (reference code: sum over C,H,W)
    timestep_sampler: str = "antithetic"  # antithetic | uniform | speed (SpeeD: tau, k)
    loss_weighting: str = "none"  # none | min-snr (gamma) | speed (SpeeD change-aware: tau, lambda)
    speed_tau: int = 700
    speed_k: float = 5.0
    speed_lambda: float = 0.6
    min_snr_gamma: float = 5.0
    t_min: int = 0  # train only on timesteps t_min..t_max (a TA-EB region)
    t_max: int | None = None  # None = T-1


@dataclass
class TrainConfig:
    iters: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per step; train.batch_size stays the effective batch (the recipe's)
    lr_schedule: str = "constant"  # constant (the reference) | linear | cosine | cosine_with_restarts | polynomial
    lr_warmup: int = 0  # iterations of linear warm-up from 0 to train.lr
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay = min(ema_decay, (1 + n) / (10 + n))
    ema_power: float | None = None  # diffusers EMAModel's warm-up: decay = 1 - (1 + n / ema_inv_gamma) ** -ema_power
    ema_inv_gamma: float = 1.0
    ema_min_decay: float = 0.0
    ema_start: int = 0  # the EMA copies the online weights for the first N steps (EMAModel's update_after_step)
    ema_every: int = 1  # update the EMA every N steps
    seed: int = 1234
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_last: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    mixed_precision: str = "auto"  # auto (bf16 on a GPU, fp32 on the CPU) | bf16 | no
    channels_last: Union[bool, str] = "auto"  # auto = on a GPU
    # auto: on one GPU reduce-overhead when the planned iterations repay the compilation (ebdiff.training.autocompile),
    # default on several GPUs, none on the CPU | none | default | reduce-overhead | ...
    compile: str = "auto"
    compile_cache: str = "auto"  # folder of the compile cache (auto = $EBDIFF_COMPILE_CACHE or ~/.cache/ebdiff/compile) | none
    layout_opt: bool = False  # compiled steps: force inductor's channels-last layout optimisation (fewer cuDNN layout copies)
    fused_optimizer: Union[bool, str] = "auto"  # auto = fused Adam on a GPU
    cudnn_benchmark: Union[bool, str] = "auto"  # auto = on a GPU: cuDNN times its conv algorithms once per shape
    cuda_graph: bool = False  # GPU, one process: the whole step as one CUDA graph (compile=auto becomes default)
    nonfinite: str = "stop"  # a non-finite loss or weights: stop (no checkpoint written) | skip (drop that step)
    log_with: str = "none"  # none | tensorboard | wandb (accelerate's trackers; metrics.jsonl is always written)
    sample_every: int = 0  # every N iterations: a 16-image grid of the EMA model in RUN/samples/ (and the tracker)
    progress: bool = True
    # a wall-clock budget: stop after this many seconds of the run's own training (evaluation excluded),
    # with a checkpoint and a finished summary; None = train.iters only
    max_seconds: float | None = None
    # evaluation during training (training_eval.EvalHook): every N iterations (500) or N seconds of training
    # time ("120s"); None = off. Each point samples the EMA model and scores it -> metrics.jsonl
    eval_every: Union[int, str, None] = None
    eval_n: int = 1000  # images per evaluation point
    eval_steps: int | None = None  # sampling steps of those points (None = sample.steps)
    eval_metric: str = "fd"  # fd (FD-<dataset>, ebdiff's classifier features, offline) | fid (Inception)
    eval_inception_weights: str | None = None  # pt_inception-2015-12-05-6726825d.pth for eval_metric=fid
    eval_classifier_epochs: int | None = None  # epochs of the feature classifier if it is not cached yet


@dataclass
class SampleConfig:
    sampler: str = "ddim"  # ddim | ddpm (sampling.SAMPLERS)
    steps: int = 100
    spacing: str = "quad"  # quad (reference) | uniform | trailing
    eta: float = 0.0
    variance: str = "fixedlarge"  # DDPM: fixedlarge (reference) | fixedsmall
    clip_x0: bool = False  # DDIM: clip the predicted x0 to [-1, 1] (diffusers' clip_sample; the reference: off)
    mixed_precision: str = "auto"  # auto (bf16 autocast on a GPU, fp32 on the CPU) | bf16 | no
    # torch.compile of the eps model(s): auto = reduce-overhead (CUDA graphs) on a GPU when the job makes
    # at least COMPILE_MIN_CALLS model calls (compilation costs about a minute), else none
    compile: str = "auto"
    n: int = 64
    batch_size: int = 256
    use_ema: bool = True
    seed: int = 0
    guidance: float | None = None  # class-conditional models: classifier-free guidance scale (None: plain conditional)
    classes: list[int] | None = None  # class-conditional models: the classes to sample (None: all, evenly)


@dataclass
class EarlyBirdConfig:
    ratio: float | None = None  # None = dense training; a number in (0, 1) turns EB search on
    criterion: str = "magnitude"  # magnitude | taylor | diff-pruning | random (pruning.CRITERIA)
    eta: float = 0.1
    queue: int = 5
    check_every: Union[int, str] = "epoch"  # iterations, or "epoch" (one pass over the data)
    mask_source: str = "online"  # online | ema
    reinit: bool = False
    max_search_iters: int | None = None  # None = no limit besides train.iters
    on_miss: str = "continue-dense"  # continue-dense | extract-anyway
    taylor_timesteps: int = 32  # timesteps per taylor/diff-pruning score (reference: all 1000)
    taylor_batch: int = 16
    diff_threshold: float = 0.05
    # round every group's surviving channels to a multiple of this (8 or 16: tensor-core friendly widths);
    # 1 = the paper's ticket sizes. Also used by prune.from_run and `ebdiff bench --round`.
    round_channels: int = 1
    # the ticket keeps the dense phase's Adam moments and EMA, restricted to the kept channels (false: fresh)
    carry_state: bool = False  # measured (benchmarks, fmnist_carry_cpu): 2-3 FD worse than a fresh start over 3 seeds


@dataclass
class PruneConfig:
    """Dense-then-prune baselines: prune a finished dense run once, then train the pruned model.
    reinit=false is train-prune-finetune; reinit=true is "Scratch" (the structure only). Gradient
    criteria use early_bird.taylor_timesteps / taylor_batch / diff_threshold."""

    from_run: str | None = None  # a finished dense run folder; None = no pruning baseline
    ratio: float = 0.5
    criterion: str = "magnitude"  # magnitude | taylor | diff-pruning | random
    weights: str = "ema"  # which dense weights are scored and kept: ema (what it samples with) | online
    reinit: bool = False


@dataclass
class TAEBConfig:
    route: str = "higher-noise"  # overlap routing at sampling time: higher-noise (reference) | midpoint
    procs_per_region: int = 1  # data-parallel processes per region branch
    launch: str = "auto"  # auto (one process per branch via torch.distributed) | sequential


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    early_bird: EarlyBirdConfig = field(default_factory=EarlyBirdConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    taeb: TAEBConfig = field(default_factory=TAEBConfig)
    regions: list[dict] | None = None  # TA-EB: [{t: [lo, hi], ratio: r, iters?: n, eta?: e}, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunSpec:
    """What kind of run a config asks for, decided once: the trainer picks its first model and its hooks
    from it, `ebdiff experiment` and `ebdiff report` name methods by it.

    dense: train the preset. early-bird: dense search, then the ticket (early_bird.ratio). taeb-branch:
    an Early-Bird run on a TA-EB region's timesteps. prune-from-run: prune a finished dense run once,
    then train the pruned model (train-prune-finetune, or Scratch with prune.reinit). ta-eb: a config
    with `regions`, which `ebdiff ta-eb` splits into taeb-branch runs."""

    kind: str

    @property
    def searches(self) -> bool:
        return self.kind in ("early-bird", "taeb-branch")

    @classmethod
    def of(cls, cfg: "Config") -> "RunSpec":
        if cfg.regions:
            return cls("ta-eb")
        if cfg.prune.from_run is not None:
            return cls("prune-from-run")
        if cfg.early_bird.ratio is not None:
            d = cfg.diffusion
            ranged = d.t_min > 0 or (d.t_max is not None and d.t_max < d.timesteps - 1)
            return cls("taeb-branch" if ranged else "early-bird")
        return cls("dense")


# Settings that define what a run's weights are (the model, the data, the diffusion process, and once a
# model is pruned, how): they must match the checkpoint on --resume. Everything else (iterations, lr,
# logging, evaluation, sampling) may change on resume and takes effect.
IDENTITY_KEYS = ("model.preset", "model.num_classes", "model.autoencoder", "model.latent_scale", "model.config",
                 "model.pretrained", "data.name", "data.image_size", "data.resize", "data.limit", "diffusion.timesteps",
                 "diffusion.beta_schedule", "diffusion.beta_start", "diffusion.beta_end", "diffusion.prediction",
                 "diffusion.t_min", "diffusion.t_max")
SEARCH_IDENTITY_KEYS = ("early_bird.ratio", "early_bird.criterion", "early_bird.mask_source", "early_bird.reinit")
PRUNE_IDENTITY_KEYS = ("prune.from_run", "prune.ratio", "prune.criterion", "prune.weights", "prune.reinit")


def run_identity(cfg: "Config") -> dict[str, Any]:
    """The values of the settings that define a run's weights (`IDENTITY_KEYS`, plus the Early-Bird or
    pruning settings of runs that prune), as dotted keys."""
    flat = cfg.to_dict()
    spec = RunSpec.of(cfg)
    keys = IDENTITY_KEYS + (SEARCH_IDENTITY_KEYS if spec.searches else ()) + \
        (PRUNE_IDENTITY_KEYS if spec.kind == "prune-from-run" else ())
    return {k: flat[k.split(".")[0]][k.split(".")[1]] for k in keys}


def identity_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: saved -> now' for every identity setting of `saved` that differs now. (A setting `saved` lacks
    may be new: a dense run resumed with early_bird.ratio starts its search there.)"""
    return [f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in saved if saved[k] != now.get(k)]


COMPILE_CHOICES = ("auto", "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CHOICES: dict[str, tuple[str, ...]] = {
    "data.resize": ("pad", "resize"),
    "data.bad_images": ("error", "skip"),
    "diffusion.beta_schedule": ("linear", "cosine", "scaled_linear"),
    "diffusion.prediction": ("epsilon",),
    "diffusion.loss_reduction": ("mean", "sum"),
    "diffusion.timestep_sampler": ("antithetic", "uniform", "speed", "speed-dual"),
    "diffusion.loss_weighting": ("none", "min-snr", "speed"),
    "train.mixed_precision": ("auto", "no", "bf16"),
    "train.compile": COMPILE_CHOICES,
    "train.nonfinite": ("stop", "skip"),
    "train.lr_schedule": ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    "train.log_with": ("none", "tensorboard", "wandb"),
    "train.eval_metric": ("fd", "fid"),
    "sample.variance": ("fixedlarge", "fixedsmall"),
    "sample.mixed_precision": ("auto", "bf16", "no"),
    "sample.compile": COMPILE_CHOICES,
    "early_bird.mask_source": ("online", "ema"),
    "early_bird.on_miss": ("continue-dense", "extract-anyway"),
    "prune.weights": ("ema", "online"),
    "taeb.launch": ("auto", "sequential"),
}


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of every string choice; those naming a paper concept come from its registry
    (datasets, model presets, pruning criteria, samplers and spacings, TA-EB routing rules), so a registered
    dataset, backbone preset, criterion or sampler is a valid setting at once. The owners import neither this module nor training code (tests/test_layers.py),
    so the schema sits above the registries and below every layer that reads it; they are imported here, on use,
    because they import torch and the schema does not. diffusers' schedulers are samplers once the entry points
    have called `runs.interop.register_diffusers_samplers()`."""
    from .backbones import preset_names
    from .core.regions import ROUTES
    from .core.sampling import SAMPLERS, SPACINGS
    from .data.datasets import dataset_names
    from .pruning.engine import criterion_names

    crits = criterion_names()
    return {**CHOICES, "data.name": dataset_names(), "model.preset": preset_names(), "early_bird.criterion": crits,
            "prune.criterion": crits, "sample.sampler": tuple(SAMPLERS), "sample.spacing": SPACINGS,
            "taeb.route": ROUTES}


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is bool:
        return isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _coerce(value: Any, tp: Any) -> Any:
    """int -> float where a float is expected (YAML '1' for a float field)."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = typing.get_origin(tp)
    if origin is list and isinstance(value, list):
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner) for v in value]
    if origin in (Union, types.UnionType) and isinstance(value, int) and not isinstance(value, bool):
        args = typing.get_args(tp)
        if float in args and int not in args:
            return float(value)
    return value


def _set(section_obj: Any, section: str, key: str, value: Any) -> None:
    hints = typing.get_type_hints(type(section_obj))
    if key not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"unknown config key '{section}.{key}' (known keys in '{section}': {known})")
    tp = hints[key]
    if isinstance(value, str) and not _type_ok(value, tp) and _type_ok(1.0, tp):
        try:  # YAML 1.1 reads '2e-4' (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and not _type_ok(value, tp) and _type_ok("", tp):
        # YAML 1.1 reads no/off/false (yes/on/true) as a bool: `train.mixed_precision=no` means the choice "no"
        value = "yes" if value else "no"
    if not _type_ok(value, tp):
        raise ConfigError(
            f"config key '{section}.{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )
    setattr(section_obj, key, _coerce(value, tp))


def apply_dict(cfg: Config, data: dict[str, Any], where: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    sections = typing.get_type_hints(Config)
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section '{section}' (known: {', '.join(sections)})")
        if section == "regions":
            if values is not None and not (isinstance(values, list) and all(isinstance(v, dict) for v in values)):
                raise ConfigError("config key 'regions' must be a list of {t: [lo, hi], ratio: r} mappings")
            cfg.regions = values
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {values!r}")
        obj = getattr(cfg, section)
        for key, value in values.items():
            _set(obj, section, key, value)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if parts == ["regions"]:  # the one top-level list: regions=[{t: [0, 260], ratio: 0.3}, ...]
        try:
            return "regions", "", yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override '{text}': value is not valid YAML") from None
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key '{dotted}' must be section.key (e.g. train.iters=200)")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.__class__.__name__})") from None
    return parts[0], parts[1], value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for text in overrides:
        section, key, value = parse_override(text)
        apply_dict(cfg, {section: value} if section == "regions" else {section: {key: value}},
                   where=f"override '{text}'")
    return cfg


def _check_choices(cfg: Config) -> None:
    flat = cfg.to_dict()
    for dotted, allowed in choices().items():
        section, key = dotted.split(".")
        value = flat[section][key]
        if value not in allowed:
            raise ConfigError(f"config key '{dotted}' must be one of {', '.join(allowed)}; got {value!r}")


def _check_numbers(cfg: Config) -> None:
    """Counts that must be positive, and no nan / inf anywhere."""
    t = cfg.train
    positive = {
        "train.iters": t.iters, "train.batch_size": t.batch_size, "train.log_every": t.log_every,
        "train.ckpt_every": t.ckpt_every, "train.keep_last": t.keep_last, "sample.steps": cfg.sample.steps,
        "sample.n": cfg.sample.n, "sample.batch_size": cfg.sample.batch_size,
        "diffusion.timesteps": cfg.diffusion.timesteps,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{name}' must be positive; got {value}")
    for section, values in cfg.to_dict().items():  # nan / inf are never a setting
        for key, value in (values or {}).items() if isinstance(values, dict) else ():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"config key '{section}.{key}' must be a finite number; got {value!r}")


def _validate_optimizer(t: TrainConfig) -> None:
    """train.*: the optimizer, the EMA and the step's accumulation."""
    if t.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be positive; got {t.lr}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay' must be in [0, 1); got {t.ema_decay}")
    if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
        raise ConfigError(f"config key 'train.adam_betas' must be two numbers in [0, 1); got {t.adam_betas}")
    if t.adam_eps <= 0 or t.weight_decay < 0 or t.grad_clip < 0:
        raise ConfigError("config keys 'train.adam_eps' (> 0), 'train.weight_decay' and 'train.grad_clip' (>= 0) "
                          f"are out of range: {t.adam_eps}, {t.weight_decay}, {t.grad_clip}")
    for name, value, low in (("train.grad_accum", t.grad_accum, 1), ("train.lr_warmup", t.lr_warmup, 0),
                             ("train.ema_start", t.ema_start, 0), ("train.ema_every", t.ema_every, 1),
                             ("train.sample_every", t.sample_every, 0)):
        if value < low:
            raise ConfigError(f"config key '{name}' must be at least {low}; got {value}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    if (t.ema_power is not None and t.ema_power <= 0) or t.ema_inv_gamma <= 0 or not 0 <= t.ema_min_decay <= t.ema_decay:
        raise ConfigError("config keys 'train.ema_power', 'train.ema_inv_gamma' must be > 0 and "
                          "'train.ema_min_decay' in [0, train.ema_decay]")


def _validate_runtime(t: TrainConfig, timesteps: int) -> None:
    """train.*: the fast path's switches, the time budget and the evaluation during training."""
    if t.cuda_graph and (t.ema_power is not None or t.ema_start or t.ema_every > 1 or t.lr_warmup
                         or t.lr_schedule != "constant"):
        raise ConfigError("train.cuda_graph=true captures one fixed EMA decay and learning rate: it cannot run "
                          "train.ema_power/ema_start/ema_every or an lr warm-up/schedule")
    if t.nonfinite == "skip" and t.cuda_graph:
        raise ConfigError("train.nonfinite=skip checks every step's gradients on the host, which a captured CUDA "
                          "graph cannot do: use train.nonfinite=stop with train.cuda_graph=true")
    for key in ("channels_last", "fused_optimizer", "cudnn_benchmark"):
        if isinstance(getattr(t, key), str) and getattr(t, key) != "auto":
            raise ConfigError(f"config key 'train.{key}' must be auto, true or false; got {getattr(t, key)!r}")
    if t.max_seconds is not None and t.max_seconds <= 0:
        raise ConfigError(f"config key 'train.max_seconds' must be positive (seconds of training); got {t.max_seconds}")
    parse_every(t.eval_every, "train.eval_every")
    if t.eval_n < 2:
        raise ConfigError(f"config key 'train.eval_n' must be at least 2; got {t.eval_n}")
    if t.eval_steps is not None and not 0 < t.eval_steps <= timesteps:
        raise ConfigError(f"config key 'train.eval_steps' must be in 1..{timesteps}; got {t.eval_steps}")
    if t.eval_classifier_epochs is not None and t.eval_classifier_epochs <= 0:
        raise ConfigError(f"config key 'train.eval_classifier_epochs' must be positive; got {t.eval_classifier_epochs}")


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name of a model folder's weights


def diffusers_folder(path: Path) -> Path | None:
    """The diffusers model folder at `path`: itself when it holds a config.json, else the model folder of a
    pipeline (`unet/`, `transformer/`), else None."""
    for cand in (path, path / "unet", path / "transformer"):
        if (cand / "config.json").is_file():
            return cand
    return None


def is_diffusers_source(value: str) -> bool:
    """Whether `prune.from_run=value` names a diffusers model folder rather than an ebdiff run (which holds
    checkpoints/) or one of its checkpoint folders (which holds meta.json)."""
    path = Path(value).expanduser()
    return (path.is_dir() and not (path / "checkpoints").is_dir() and not (path / "meta.json").is_file()
            and diffusers_folder(path) is not None)


def read_model_config(value: str, key: str, weights: bool = False) -> dict:
    """The diffusers config a setting names: a config.json, or a model folder holding one (weights=True: a model
    folder whose safetensors weights are there). Anything else stops with one line naming the setting."""
    path = Path(value).expanduser()
    folder = diffusers_folder(path) if path.is_dir() else None
    if not path.exists():
        raise ConfigError(f"{key}={value} not found (expected a diffusers model folder: config.json + "
                          f"{DIFFUSERS_WEIGHTS}" + ("" if weights else ", or its config.json") + ")")
    if path.is_dir() and folder is None:
        raise ConfigError(f"{key}={value} holds no config.json (a diffusers model folder has config.json and "
                          f"{DIFFUSERS_WEIGHTS})")
    if weights and folder is None:
        raise ConfigError(f"{key}={value} is a file: it must be a diffusers model folder (config.json + "
                          f"{DIFFUSERS_WEIGHTS})")
    if weights and not any((folder / n).is_file() for n in (DIFFUSERS_WEIGHTS, DIFFUSERS_WEIGHTS + ".index.json")):
        pickled = any(folder.glob("*.bin")) or any(folder.glob("*.ckpt"))
        raise ConfigError(f"{key}={value} has no weights: {folder} lacks {DIFFUSERS_WEIGHTS}" + (
            " (its .bin file is a pickle, which ebdiff never loads: save the model with safe_serialization=True)"
            if pickled else ""))
    file = folder / "config.json" if folder is not None else path
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{key}={value}: {file} is not a readable JSON file ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}={value}: {file} is not a diffusers config (a JSON object)")
    return data


def resolve_model_config(cfg: "Config") -> None:
    """model.config as a path, or the config.json of model.pretrained's folder or of a diffusers folder given as
    prune.from_run, becomes the mapping it holds (config.yaml then records the architecture itself: a moved or
    deleted file breaks no resume, sample or load). The one step of validation that reads files."""
    mc, source = cfg.model, cfg.prune.from_run
    if mc.pretrained is not None and source is not None:
        raise ConfigError("model.pretrained and prune.from_run both give the dense weights: set one (prune.from_run "
                          "also takes a diffusers model folder: the pretrained model is pruned, then fine-tuned)")
    if isinstance(mc.config, str):
        if mc.pretrained is not None:
            raise ConfigError(f"model.pretrained={mc.pretrained} brings its own config.json: leave model.config unset")
        mc.config = read_model_config(mc.config, "model.config")
    elif mc.config is None and mc.pretrained is not None:
        mc.config = read_model_config(mc.pretrained, "model.pretrained", weights=True)
    elif mc.config is None and source is not None and is_diffusers_source(source):
        mc.config = read_model_config(source, "prune.from_run", weights=True)


def _validate_model(mc: ModelConfig) -> None:
    if not 0.0 <= mc.dropout < 1.0:
        raise ConfigError(f"config key 'model.dropout' must be in [0, 1); got {mc.dropout}")
    if mc.num_classes is not None and mc.num_classes < 1:
        raise ConfigError(f"config key 'model.num_classes' must be at least 1; got {mc.num_classes}")
    if not 0.0 <= mc.class_dropout < 1.0:
        raise ConfigError(f"config key 'model.class_dropout' must be in [0, 1); got {mc.class_dropout}")
    from .backbones import ModelSpec  # import cost: torch (the schema imports no torch)

    spec = ModelSpec.of(mc)  # model.config: its class known, its settings trainable, its classes consistent
    if mc.class_dropout and spec.num_classes is None:
        raise ConfigError("model.class_dropout needs a class-conditional model: set model.num_classes")
    if mc.autoencoder is not None and not spec.latent:
        raise ConfigError(f"model.autoencoder is for latent presets (ldm-*); model.preset={mc.preset} trains on pixels")
    if isinstance(mc.latent_scale, str) and mc.latent_scale not in ("auto", "std"):
        raise ConfigError(f"config key 'model.latent_scale' must be auto, std or a positive number; got {mc.latent_scale!r}")
    if not isinstance(mc.latent_scale, str) and not mc.latent_scale > 0:
        raise ConfigError(f"config key 'model.latent_scale' must be positive; got {mc.latent_scale}")


def _validate_data(dc: DataConfig) -> None:
    if dc.latent_shard_size < 1:
        raise ConfigError(f"config key 'data.latent_shard_size' must be positive; got {dc.latent_shard_size}")
    for name, value, low in (("data.image_size", dc.image_size, 8), ("data.limit", dc.limit, 1),
                             ("data.num_workers", dc.num_workers, 0)):
        if value is not None and value < low:
            raise ConfigError(f"config key '{name}' must be at least {low}; got {value}")


def _validate_sample(sc: SampleConfig, timesteps: int) -> None:
    if sc.guidance is not None and sc.guidance < 0:
        raise ConfigError(f"config key 'sample.guidance' must be >= 0; got {sc.guidance}")
    if sc.classes is not None and (not sc.classes or min(sc.classes) < 0):
        raise ConfigError(f"config key 'sample.classes' must list class indices >= 0; got {sc.classes}")
    if sc.eta < 0:
        raise ConfigError(f"config key 'sample.eta' must be >= 0; got {sc.eta}")
    if sc.steps > timesteps:
        raise ConfigError(f"config key 'sample.steps' ({sc.steps}) exceeds diffusion.timesteps ({timesteps})")


def _validate_diffusion(d: DiffusionConfig) -> None:
    if not 0 < d.beta_start < d.beta_end < 1:
        raise ConfigError("config keys 'diffusion.beta_start' < 'diffusion.beta_end' must lie in (0, 1)")
    t_max = d.timesteps - 1 if d.t_max is None else d.t_max
    if not 0 <= d.t_min <= t_max <= d.timesteps - 1:
        raise ConfigError(f"config keys 'diffusion.t_min'/'t_max' must satisfy 0 <= t_min <= t_max <= T-1; "
                          f"got {d.t_min}, {d.t_max}")
    uses_speed = d.timestep_sampler.startswith("speed") or d.loss_weighting == "speed"
    if uses_speed and not 0 < d.speed_tau < d.timesteps:
        raise ConfigError(f"config key 'diffusion.speed_tau' must be in 1..T-1 = {d.timesteps - 1}; got {d.speed_tau}")
    if d.speed_k <= 0 or d.min_snr_gamma <= 0:
        raise ConfigError("config keys 'diffusion.speed_k' and 'diffusion.min_snr_gamma' must be > 0")


def _validate_taeb(cfg: Config) -> None:
    if cfg.taeb.procs_per_region < 1:
        raise ConfigError("config key 'taeb.procs_per_region' must be >= 1")
    if cfg.regions is not None:
        from .core.regions import RegionSet  # the pure core's region set (it imports torch; the schema does not)

        RegionSet.from_config(cfg.regions, cfg.diffusion.timesteps)


def _validate_early_bird(eb: EarlyBirdConfig) -> None:
    if not 0 < eb.diff_threshold <= 1:
        raise ConfigError(f"config key 'early_bird.diff_threshold' must be in (0, 1]; got {eb.diff_threshold}")
    if eb.ratio is not None and not 0.0 < eb.ratio < 1.0:
        raise ConfigError(f"config key 'early_bird.ratio' must be in (0, 1); got {eb.ratio}")
    if eb.eta <= 0:
        raise ConfigError(f"config key 'early_bird.eta' must be > 0; got {eb.eta}")
    if eb.queue < 2:
        raise ConfigError(f"config key 'early_bird.queue' must be >= 2; got {eb.queue}")
    if isinstance(eb.check_every, str) and eb.check_every != "epoch":
        raise ConfigError(f"config key 'early_bird.check_every' must be 'epoch' or a positive integer; got {eb.check_every!r}")
    if isinstance(eb.check_every, int) and eb.check_every <= 0:
        raise ConfigError(f"config key 'early_bird.check_every' must be positive; got {eb.check_every}")
    if eb.max_search_iters is not None and eb.max_search_iters <= 0:
        raise ConfigError(f"config key 'early_bird.max_search_iters' must be positive; got {eb.max_search_iters}")
    if eb.round_channels < 1:
        raise ConfigError(f"config key 'early_bird.round_channels' must be >= 1 (1 = no rounding); got {eb.round_channels}")
    if eb.carry_state and eb.reinit:
        raise ConfigError("config key 'early_bird.carry_state' keeps the dense phase's optimizer state and EMA, "
                          "which early_bird.reinit=true throws away: set one of them to false")
    if eb.taylor_timesteps <= 0 or eb.taylor_batch <= 0:
        raise ConfigError("config keys 'early_bird.taylor_timesteps' and 'early_bird.taylor_batch' must be positive")


def _validate_prune(pr: PruneConfig, eb: EarlyBirdConfig) -> None:
    if pr.from_run is not None:
        if not 0.0 < pr.ratio < 1.0:
            raise ConfigError(f"config key 'prune.ratio' must be in (0, 1); got {pr.ratio}")
        if eb.ratio is not None:
            raise ConfigError("prune.from_run (a dense-then-prune baseline) and early_bird.ratio (Early-Bird "
                              "search) exclude each other: set one")


def validate(cfg: Config) -> Config:
    """Every setting in range, section by section (the choices and the numbers of every section first); the
    first problem stops with one `ConfigError` line naming the key."""
    _check_choices(cfg)
    _check_numbers(cfg)
    resolve_model_config(cfg)
    T = cfg.diffusion.timesteps
    _validate_optimizer(cfg.train)
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    _validate_sample(cfg.sample, T)
    _validate_runtime(cfg.train, T)
    _validate_diffusion(cfg.diffusion)
    _validate_taeb(cfg)
    _validate_early_bird(cfg.early_bird)
    _validate_prune(cfg.prune, cfg.early_bird)
    return cfg


EVERY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*s\s*$")


def parse_every(value: Any, key: str = "train.eval_every") -> tuple[str, float] | None:
    """A cadence: a positive integer is a number of iterations -> ("iters", n); a string "<number>s" is
    seconds of training time -> ("seconds", x); None is off. Anything else stops with one line."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return "iters", value
    m = EVERY_RE.match(value) if isinstance(value, str) else None
    if m and float(m.group(1)) > 0:
        return "seconds", float(m.group(1))
    raise ConfigError(f"config key '{key}' must be a positive number of iterations (e.g. 500) or of training "
                      f"seconds with an s (e.g. 120s); got {value!r}")


def read_yaml(path: Path, kind: str = "config") -> Any:
    """A YAML file's content; a missing, empty, binary or malformed file stops with one line (an empty
    file is a mistake, not a request for every default: 800,000 iterations of them)."""
    if not path.is_file():
        raise ConfigError(f"{kind} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{kind} file {path} is not a text (YAML) file") from None
    except yaml.YAMLError as exc:
        first = str(exc).replace("\n", " ")
        raise ConfigError(f"{kind} file {path} is not valid YAML: {first}") from None
    if data is None:
        raise ConfigError(f"{kind} file {path} is empty")
    return data


def bundled_configs() -> Path:
    """The folder of the configs shipped inside the package (`configs/` of the repository links to it)."""
    return Path(__file__).resolve().parent / "configs"


def find_config(name: str | Path, kind: str = "config") -> Path:
    """A config (kind="config") or experiment file (kind="experiment"): the path itself when it exists (a path
    always wins), else a bundled file by name: `fmnist`, `fmnist.yaml`, or a README path like
    `configs/fmnist.yaml` / `configs/experiments/cifar10_table4.yaml` run outside the repository. A missing
    file stops with one line that lists the bundled names."""
    path = Path(name)
    if path.is_file():
        return path
    root = bundled_configs()
    sub = root / "experiments" if kind == "experiment" else root
    parts = path.parts
    rel, base = None, sub
    if not path.is_absolute() and len(parts) > 1 and parts[0] == "configs":
        rel, base = Path(*parts[1:]), root  # a README path, from outside the repository
    elif len(parts) == 1:
        rel = path
    if rel is not None:
        for cand in (base / rel, base / rel.with_name(rel.name + ".yaml")):
            if cand.is_file():
                return cand
    known = ", ".join(sorted(p.stem for p in sub.glob("*.yaml")))
    raise ConfigError(f"{kind} file not found: {name} (bundled {kind}s, usable by name: {known})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A validated Config from a YAML file (a path, or a bundled config's name: `find_config`) and overrides."""
    cfg = Config()
    if path is not None:
        path = find_config(path)
        apply_dict(cfg, read_yaml(path), where=str(path))
    apply_overrides(cfg, overrides or [])
    return validate(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    return validate(apply_dict(Config(), data))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

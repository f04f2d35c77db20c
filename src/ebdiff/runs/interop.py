"""diffusers interop, in one place: runs as diffusers models, diffusers' schedulers as samplers, model folders.

- `load(path)`: a dense run or a ticket as a diffusers `UNet2DModel` (a ticket is rebuilt by replaying its
  pruning plan on its preset, no unpickling), a TA-EB run as one `RoutedUNet` that routes each timestep to
  its region's ticket and has the UNet call signature (`model(sample, timestep).sample`). Either runs in
  diffusers' pipelines and scheduler loops unchanged. `path`: a run, a checkpoint, a TA-EB run or an
  exported folder.
- `export(run, out)`: a self-contained model folder (safetensors weights, the pruning plan as JSON, the
  resolved config.yaml, regions.json for TA-EB, the scheduler config, a model card) that `load` rebuilds
  without the run folder. A dense model's folder is also a diffusers pipeline's where one takes it
  (`Backbone.pipeline`): an unconditional pixel UNet's a `DDIMPipeline`, a latent DiT's a `DiTPipeline` (with
  the run's autoencoder in `vae/`). A pixel DiT's `transformer/` and `scheduler/` load in plain diffusers.
- `scheduler(name, config)`: a diffusers scheduler (`SCHEDULERS`) configured to a run's noise schedule.
  Each is also an ebdiff sampler, `diffusers-<name>` in `sampling.SAMPLERS` (`ebdiff sample --scheduler`),
  beside ebdiff's own DDIM and DDPM, which stay the reference.

Timestep conventions (checked in tests/test_interop.py): ebdiff's `uniform` spacing is diffusers'
`leading` with steps_offset=0, and DDIM's last step goes to alpha-bar 1 (diffusers' set_alpha_to_one=True);
ebdiff's `trailing` is diffusers' `trailing`; ebdiff's `quad` (the reference's) has no diffusers name:
schedulers that accept a list of timesteps (dpm-solver++, euler) visit it exactly, the others refuse it.
ebdiff's `clip_x0` is DDIMScheduler's clip_sample with use_clipped_model_output=True.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..backbones import DiffusersLike, ModelSpec, backbone_of, count_macs_params, eps_fn, format_count
from ..config import DIFFUSERS_WEIGHTS, Config, diffusers_folder, dump_yaml, read_model_config
from ..core.diffusion import Schedule
from ..core.regions import RegionRouter, RegionSet
from ..core.sampling import SAMPLERS, ddim_timesteps, model_at, register_sampler, visited_timesteps
from ..data.latents import load_autoencoder
from ..errors import CheckpointError, ConfigError
from . import checkpoint as ck
from .confine import inside
from .folders import (
    EXPORT_FORMAT,
    EXPORT_KINDS,
    MANIFEST,
    REGIONS_FILE,
    read_manifest,
    read_regions,
    regions_record,
    run_config,
    run_kind,
)

PLAN_FILE = "plan.json"  # a member's preset, dropout and pruning plan
WEIGHTS_FILE = DIFFUSERS_WEIGHTS  # diffusers' name, so a dense `unet/` loads in diffusers
SAMPLER_PREFIX = "diffusers-"  # sampling.SAMPLERS name of a diffusers scheduler
VAE = "vae"  # a DiTPipeline folder's autoencoder


# ---------------------------------------------------------------------- diffusers' schedulers
@dataclass(frozen=True)
class SchedulerSpec:
    cls: str  # the diffusers class
    kwargs: dict  # beyond the run's schedule (T, betas, epsilon prediction)
    any_timesteps: bool  # set_timesteps(timesteps=[...]) visits any list, ebdiff's quad spacing too
    options: tuple[str, ...] = ()  # the sample.* settings it takes


SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler", {"set_alpha_to_one": True, "steps_offset": 0}, False, ("eta", "clip_x0")),
    "dpm-solver++": SchedulerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
                                  True),
    # timestep_spacing only sets Euler's init_noise_sigma here (it visits a list): `leading` gives the exact
    # sqrt(sigma_max^2 + 1), `linspace`/`trailing` round it to sigma_max (off by 1e-3 in images at quad's t = 800)
    "euler": SchedulerSpec("EulerDiscreteScheduler", {"timestep_spacing": "leading"}, True),
    "euler-ancestral": SchedulerSpec("EulerAncestralDiscreteScheduler", {}, False),
}


def scheduler_spec(name: str) -> SchedulerSpec:
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown diffusers scheduler '{name}' (known: {', '.join(SCHEDULERS)})")
    return SCHEDULERS[name]


def schedule_kwargs(schedule: Schedule) -> dict[str, Any]:
    """The diffusers scheduler arguments of a noise schedule: linear betas by their ends (diffusers' usual
    config), any other schedule as its betas."""
    b = schedule.betas.double()
    lin = torch.linspace(float(b[0]), float(b[-1]), schedule.T, dtype=torch.float64)
    if torch.allclose(b, lin, rtol=0, atol=1e-12):
        return {"beta_schedule": "linear", "beta_start": float(b[0]), "beta_end": float(b[-1])}
    return {"trained_betas": b.tolist()}


def make_scheduler(name: str, schedule: Schedule, *, clip_x0: bool = False, **overrides):
    """A diffusers scheduler `name` over the schedule (T, betas, epsilon prediction); overrides: any of its
    constructor's arguments (e.g. timestep_spacing)."""
    import diffusers

    spec = scheduler_spec(name)
    kw = dict(num_train_timesteps=schedule.T, prediction_type="epsilon", **schedule_kwargs(schedule), **spec.kwargs)
    if name == "ddim":
        kw["clip_sample"] = bool(clip_x0)
    kw.update(overrides)
    return getattr(diffusers, spec.cls)(**kw)


def native_spacing(name: str, T: int, timesteps: Sequence[int]) -> str:
    """diffusers' timestep_spacing that visits exactly these (ascending) timesteps, for a scheduler that takes
    no list of timesteps; ConfigError when none does."""
    n = len(timesteps)
    if list(timesteps) == ddim_timesteps(T, n, "uniform"):
        return "leading"
    # DDIMScheduler.step assumes a stride of T // n: its trailing spacing is consistent only when n divides T
    if list(timesteps) == ddim_timesteps(T, n, "trailing") and (name != "ddim" or T % n == 0):
        return "trailing"
    hint = (f"a number of steps that divides T = {T}" if name == "ddim" and list(timesteps) ==
            ddim_timesteps(T, n, "trailing") else "--spacing uniform (diffusers' 'leading') or trailing")
    raise ConfigError(f"diffusers' {SCHEDULERS[name].cls} cannot visit these timesteps (ebdiff's quad spacing, the "
                      f"reference's, has no diffusers name): use {hint}, or a scheduler that takes any timesteps "
                      f"({', '.join(k for k, s in SCHEDULERS.items() if s.any_timesteps)}), or ebdiff's own ddim")


def scheduler_timesteps(name: str):
    """The registry's timesteps function of a diffusers scheduler: ebdiff's spacing, checked against what
    the scheduler can visit."""

    def fn(T: int, steps: int, spacing: str) -> list[int]:
        ts = ddim_timesteps(T, steps, spacing)
        if not SCHEDULERS[name].any_timesteps:
            native_spacing(name, T, ts)
        return ts

    return fn


def prepared_scheduler(name: str, schedule: Schedule, timesteps: Sequence[int], device, clip_x0: bool = False):
    """A diffusers scheduler set to visit exactly `timesteps` (ascending), or ConfigError."""
    ts = sorted(set(int(t) for t in timesteps))
    if SCHEDULERS[name].any_timesteps:
        sched = make_scheduler(name, schedule, clip_x0=clip_x0)
        sched.set_timesteps(timesteps=ts[::-1], device=device)
    else:
        sched = make_scheduler(name, schedule, clip_x0=clip_x0, timestep_spacing=native_spacing(name, schedule.T, ts))
        sched.set_timesteps(len(ts), device=device)
    got = sorted(set(int(round(float(t))) for t in sched.timesteps.tolist()))
    if got != ts:  # a diffusers version whose spacing differs from the one checked here
        raise ConfigError(f"diffusers' {SCHEDULERS[name].cls} visits {got[:4]}... instead of {ts[:4]}...")
    return sched


@torch.no_grad()
def scheduler_sample(model, x: torch.Tensor, schedule: Schedule, timesteps: list[int], *, name: str,
                     generator: torch.Generator | None = None, eta: float = 0.0, clip_x0: bool = False) -> torch.Tensor:
    """diffusers' scheduler loop (init_noise_sigma, scale_model_input, step) over an ebdiff eps model: the
    sampler `diffusers-<name>`, with the registry's signature."""
    sched = prepared_scheduler(name, schedule, timesteps, x.device, clip_x0)
    step_kw = {"eta": eta, "use_clipped_model_output": clip_x0} if name == "ddim" else {}
    x = x * sched.init_noise_sigma
    for t, tv in zip(sched.timesteps, sched.timesteps.tolist()):
        inp = sched.scale_model_input(x, t)
        eps = model_at(model, int(round(tv)))(inp, t.reshape(1).expand(x.shape[0])).float()
        x = sched.step(eps, t, x, generator=generator, **step_kw).prev_sample
    return x


def register_diffusers_samplers() -> None:
    """Make every diffusers scheduler of `SCHEDULERS` the sampler `diffusers-<name>` in `sampling.SAMPLERS`
    (idempotent). Runs when this module is imported; the entry points (the CLI, `ebdiff`'s API and the
    application layer `ebdiff.app`) call it so the names are valid settings before a config is validated."""
    for name, spec in SCHEDULERS.items():
        if SAMPLER_PREFIX + name not in SAMPLERS:
            register_sampler(SAMPLER_PREFIX + name, scheduler_timesteps(name), spec.options)(
                functools.partial(scheduler_sample, name=name))


register_diffusers_samplers()


def as_config(config=None):
    """A Config from None (ebdiff's defaults), a Config, or a run / checkpoint / exported folder."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    return run_config(Path(config))


def scheduler(name: str = "ddim", config=None, **overrides):
    """The diffusers scheduler `name` (ddim, dpm-solver++, euler, euler-ancestral) configured to a run's
    noise schedule (linear betas 1e-4..0.02 over T = 1000 and epsilon prediction unless the run says
    otherwise; DDIM's clip_sample = the run's sample.clip_x0). config: a Config, a run / export folder,
    or None for ebdiff's defaults. overrides: the scheduler's own arguments, e.g. timestep_spacing='trailing'."""
    cfg = as_config(config)
    return make_scheduler(name, Schedule.from_config(cfg.diffusion), clip_x0=cfg.sample.clip_x0 and name == "ddim",
                          **overrides)


# ---------------------------------------------------------------------- the TA-EB ensemble as one UNet
class RoutedUNet(DiffusersLike):
    """A TA-EB ensemble with `UNet2DModel`'s call signature: `model(sample, timestep).sample` sends each
    sample to the ticket of its timestep's region (`RegionSet.route`), so diffusers' pipelines and
    scheduler loops run it as one UNet. `config` is the first member's (sample_size, in_channels, ...)
    plus the regions; `dtype` and `device` are its parameters'. ebdiff's samplers route per step through
    `at(t)` (the `sampling.Routed` protocol)."""

    def __init__(self, unets: Sequence[nn.Module], regions: RegionSet, route: str = "higher-noise"):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        RegionRouter(list(unets), regions, route)  # one model per region, a known rule: or one line
        self.unets = nn.ModuleList(unets)
        self.regions, self.route = regions, route
        self._config = FrozenDict({**dict(unets[0].config), "_class_name": type(self).__name__,
                                   "regions": regions.to_config(), "route": route})

    @property
    def config(self):
        return self._config

    @property
    def router(self) -> RegionRouter:
        """The eps-model router over the current members (built on use: a copy of this module routes to its
        own members)."""
        return RegionRouter([eps_fn(u) for u in self.unets], self.regions, self.route)

    def at(self, t: int):
        return eps_fn(self.unets[self.regions.route(int(t), self.route)])

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, **kwargs):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        t = timestep  # broadcast as UNet2DModel.forward does
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.long, device=sample.device)
        elif t.ndim == 0:
            t = t[None].to(sample.device)
        t = t * torch.ones(sample.shape[0], dtype=t.dtype, device=t.device)
        out = self.router(sample, t) if class_labels is None else self.router(sample, t, class_labels)
        return UNet2DOutput(sample=out) if return_dict else (out,)


# ---------------------------------------------------------------------- diffusers model folders: model.pretrained
def load_pretrained(model: nn.Module, folder: str | Path, key: str = "model.pretrained") -> nn.Module:
    """Load the weights of a local diffusers model folder (config.json + safetensors, read by diffusers'
    `from_pretrained` offline, never a pickle) into `model`, an ebdiff model of that folder's architecture (into
    its backbone's `weights_module`: a class-conditional latent UNet's class table is ebdiff's and stays as it is).
    A folder without weights, weights that do not read, or do not fit the model, stop with one line naming `key`."""
    import diffusers

    config = read_model_config(str(folder), key, weights=True)
    name = config.get("_class_name")
    target = backbone_of(model).weights_module(model)
    if name != type(target).__name__ or not hasattr(diffusers, name):
        raise ConfigError(f"{key}={folder} holds a {name}, but this run's model is a {type(target).__name__}")
    try:
        loaded = getattr(diffusers, name).from_pretrained(str(diffusers_folder(Path(folder).expanduser())),
                                                          local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}={folder}: diffusers cannot load its weights ({first})") from None
    sd = loaded.state_dict()
    misfit = ck.state_misfit(target.state_dict(), sd, "there", "missing there")
    if misfit is not None:
        raise ConfigError(f"{key}={folder}: its weights do not fit this run's model: {misfit[0]}")
    bad = ck.first_nonfinite(sd.items())
    if bad is not None:
        raise ConfigError(f"{key}={folder}: its weights hold non-finite values (tensor '{bad}')")
    target.load_state_dict(sd, strict=True)
    return model


def model_label(meta: dict) -> str:
    """How a model card and error lines name a model: its preset, or the diffusers class of its model.config."""
    spec = ModelSpec.from_meta(meta)
    if spec.preset is not None:
        return f"preset `{spec.preset}`"
    return f"a `{spec.backbone.diffusers_class}` of its own config"


# ---------------------------------------------------------------------- reading any model source
@dataclass
class Loaded:
    """The models of a run, checkpoint, TA-EB run or export: one per region for TA-EB, else one."""

    models: list[nn.Module]
    metas: list[dict]  # each: preset, dropout, phase, plan, iteration, image_shape, checkpoint
    weights: str  # ema | online
    regions: RegionSet | None = None
    route: str | None = None


def load_member(folder: Path, device) -> tuple[nn.Module, dict]:
    """One exported model: its preset, with its plan replayed, and its safetensors weights (no pickle)."""
    meta = ck.read_json(inside(folder, PLAN_FILE, "plan file"))
    if not isinstance(meta, dict) or "preset" not in meta:
        raise CheckpointError(f"{folder}/{PLAN_FILE} is missing or unreadable")
    try:
        model = ck.build_from_meta(meta)
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{folder}/{PLAN_FILE}: the pruning plan does not replay on "
                              f"{model_label(meta)} ({type(exc).__name__}: {first})") from None
    ck.load_weights(model, inside(folder, WEIGHTS_FILE, "weights file"))
    return model.to(device).eval(), meta


def read_models(path: str | Path, ema: bool | None = None, device: str | torch.device = "cpu") -> Loaded:
    """The models behind `path` (run, checkpoint, TA-EB run or export). ema: True = the EMA weights, False =
    the online ones, None = EMA where a run has them, an export's one set otherwise."""
    path = Path(path)
    kind = run_kind(path)
    if kind == "export":
        man = read_manifest(path)
        if ema is not None and man["weights"] != ("ema" if ema else "online"):
            raise CheckpointError(f"{path} holds the {man['weights']} weights only (export with"
                                  f"{'out' if ema else ''} --no-ema for the other set)")
        pairs = [load_member(path / name, device) for name in man["members"]]
        metas = [dict(m, checkpoint=f"export:{name}") for (_, m), name in zip(pairs, man["members"])]
        if all(m.get("latent") for m in metas) and (path / VAE / "config.json").is_file():
            vae = inside(path, VAE, "autoencoder folder")  # a DiTPipeline folder decodes with its own copy
            metas = [dict(m, latent=dict(m["latent"], autoencoder=str(vae))) for m in metas]
        regions, route = (read_regions(path)[0], man.get("route")) if man["kind"] == "ta-eb" else (None, None)
        return Loaded([m for m, _ in pairs], metas, man["weights"], regions, route)
    use_ema = ema is not False
    if kind == "ta-eb":
        regions, spec = read_regions(path)
        models, metas = [], []
        for name in spec["members"]:
            ckpt = ck.resolve_checkpoint(path / name)
            m, meta = ck.load_model(ckpt, ema=use_ema, device=device)
            models.append(m)
            metas.append(dict(meta, checkpoint=ckpt.name))
        return Loaded(models, metas, "ema" if use_ema else "online", regions, spec["route"])
    ckpt = ck.resolve_checkpoint(path)
    model, meta = ck.load_model(ckpt, ema=use_ema, device=device)
    return Loaded([model], [dict(meta, checkpoint=ckpt.name)], "ema" if use_ema else "online")


def load(path: str | Path, ema: bool | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """A run as a diffusers model, in eval mode: a dense run or a ticket as its backbone's model (`UNet2DModel`,
    `DiTTransformer2DModel`, ...; EMA weights by default; a ticket's architecture rebuilt from its pruning
    plan), a TA-EB run as a `RoutedUNet`.
    path: a run folder (its newest checkpoint), a checkpoint folder, a TA-EB run folder or a folder written
    by `export`. ema: True = EMA weights, False = online weights, None = EMA (an export: the set it holds)."""
    got = read_models(path, ema, device)
    if got.regions is None:
        return got.models[0]
    return RoutedUNet(got.models, got.regions, got.route).to(device).eval()


# ---------------------------------------------------------------------- export
def export_facts(path: Path, got: Loaded, cfg) -> dict:
    """What the model card says, read from the run: sizes, quality (eval.json), training time."""
    run = ck.run_folder(path)
    sizes = [count_macs_params(m) for m in got.models]
    facts: dict[str, Any] = {"source": str(Path(path).resolve()), "weights": got.weights,
                             "preset": got.metas[0].get("preset"), "model": model_label(got.metas[0]),
                             "iterations": [m.get("iteration") for m in got.metas],
                             "phases": [m.get("phase") for m in got.metas], "members": []}
    m0 = got.metas[0]  # a dense model may be a diffusers pipeline's folder as well (`Backbone.pipeline`)
    bb = ModelSpec.from_meta(m0).backbone
    facts["component"], facts["shape"] = bb.component, list(bb.sample_shape(got.models[0]))
    facts["pipeline"] = bb.pipeline(m0) if got.regions is None and m0.get("phase") == "dense" else None
    if m0.get("latent") and not (Path(m0["latent"]["autoencoder"]).expanduser() / "config.json").is_file():
        facts["pipeline"] = None  # a latent pipeline decodes with the run's autoencoder, which is not there
    if m0.get("num_classes") is not None:
        facts["classes"] = m0["num_classes"]
    if m0.get("latent"):
        facts["autoencoder"] = m0["latent"]["autoencoder"]
    if got.regions is not None:
        ts = visited_timesteps(cfg.sample, got.regions.T)
        facts["params"] = got.regions.weighted([p for _, p in sizes], ts, got.route)
        facts["macs"] = got.regions.weighted([m for m, _ in sizes], ts, got.route)
        facts["weighted_over"] = f"{len(ts)} {cfg.sample.sampler} steps ({cfg.sample.spacing} spacing, {got.route} routing)"
        facts["members"] = [{"t": [r.lo, r.hi], "ratio": r.ratio, "params": p, "macs": m}
                            for r, (m, p) in zip(got.regions, sizes)]
    else:
        facts["macs"], facts["params"] = sizes[0]
    summ, taeb, ev = (ck.read_json(run / n) for n in ("summary.json", "taeb.json", "eval.json"))
    if taeb:
        facts["train_s"] = taeb.get("taeb_train_s")
    elif summ:
        facts["train_s"] = summ.get("time_s", {}).get("train_total")
        facts["dense_iterations"], facts["ticket_iterations"] = summ.get("dense_iterations"), summ.get("ticket_iterations")
        if summ.get("dense"):
            facts["dense"] = summ["dense"]
        info = summ.get("ticket_info")
        if info and info.get("found", True) and got.metas[0].get("phase") == "ticket":
            facts["ticket_iteration"] = info.get("iteration")
    if ev:
        facts["quality"] = [{"metric": m["name"], "value": m["value"], "kid": m.get("kid"),
                             "floor": m.get("floor_train_vs_test"), "n": ev.get("n_samples"),
                             "steps": ev.get("sampling", {}).get("sampler", {}).get("steps"),
                             "checkpoint": ev.get("checkpoint")} for m in ev.get("metrics", {}).values()]
    return facts


def model_card(name: str, kind: str, facts: dict) -> str:
    """The export's README.md (pure: facts -> Markdown)."""
    phase = facts["phases"][0]
    what = {"dense": "A dense DDPM", "ticket": "An Early-Bird ticket (a pruned DDPM found during training)",
            "pruned": "A pruned DDPM (a dense-then-prune baseline)"}.get(phase, f"A DDPM ({phase})")
    if kind == "ta-eb":
        what = f"A TA-EB ensemble of {len(facts['members'])} region tickets, routed by timestep"
    weights = "EMA" if facts["weights"] == "ema" else "online"
    model = facts.get("model") or f"preset `{facts['preset']}`"
    lines = [f"# {name}", "", f"{what}: {model}, trained with ebdiff (EB-Diff-Train), "
             f"{weights} weights of iteration {', '.join(str(i) for i in facts['iterations'])}.", "",
             "| | |", "|---|---|",
             f"| parameters | {format_count(facts['params'])}"
             + (f" (weighted over {facts['weighted_over']})" if kind == "ta-eb" else "") + " |",
             f"| MACs (one image) | {format_count(facts['macs'])} |"]
    if facts.get("dense"):
        lines.append(f"| dense model | {format_count(facts['dense']['params'])} params, "
                     f"{format_count(facts['dense']['macs'])} MACs |")
    if facts.get("ticket_iteration") is not None:
        lines.append(f"| Early-Bird ticket drawn at | iteration {facts['ticket_iteration']} |")
    if facts.get("dense_iterations") is not None:
        lines.append(f"| iterations | {facts['dense_iterations']} dense + {facts['ticket_iterations']} pruned |")
    if facts.get("train_s") is not None:
        lines.append(f"| training time | {facts['train_s']:.1f} s" + (" (the longest branch)" if kind == "ta-eb" else "")
                     + " |")
    for q in facts.get("quality", []):
        floor = "" if q.get("floor") is None else f", floor {q['floor']:.3f}"
        lines.append(f"| {q['metric']} | {q['value']:.3f} (KID {q['kid']:.4f}{floor}; {q['n']} samples, "
                     f"{q['steps']} steps, {q['checkpoint']}) |")
    if not facts.get("quality"):
        lines.append("| quality | not measured (run `ebdiff eval` on the run before exporting) |")
    for k, m in enumerate(facts.get("members", [])):
        lines.append(f"| region {k}: t in [{m['t'][0]}, {m['t'][1]}], ratio {m['ratio']} | "
                     f"{format_count(m['params'])} params, {format_count(m['macs'])} MACs |")
    lines += use_lines(name, kind, facts)
    lines += ["", f"Files: `{MANIFEST}` (what this folder holds), `config.yaml` (the run's resolved config), "
              "`scheduler/` (diffusers DDIMScheduler config of the run's schedule), "
              + ("`regions.json` and `region-*/`" if kind == "ta-eb" else f"`{kind}/`")
              + f" (`{WEIGHTS_FILE}`, `{PLAN_FILE}`: preset and pruning plan, `config.json`)"
              + (f", `{VAE}/` (the run's autoencoder; `scaling_factor` = the run's latent scale)"
                 if facts.get("pipeline") == "DiTPipeline" else "") + ".", ""]
    return "\n".join(lines)


def use_lines(name: str, kind: str, facts: dict) -> list[str]:
    """The model card's "Use" section (pure): ebdiff's commands, and what plain diffusers loads of the folder."""
    classes, component = facts.get("classes"), facts.get("component", "unet")
    if component == "unet" and classes is None and not facts.get("autoencoder"):
        lines = ["", "## Use", "", "```python", "import ebdiff, torch", "from diffusers import DDIMPipeline", "",
                 f"model = ebdiff.load('{name}')  # {'RoutedUNet' if kind == 'ta-eb' else 'UNet2DModel'}, "
                 "no unpickling", f"pipe = DDIMPipeline(model, ebdiff.scheduler('ddim', '{name}'))",
                 "images = pipe(batch_size=16, num_inference_steps=100, "
                 "generator=torch.Generator().manual_seed(0)).images",
                 "```", "", "or `ebdiff sample " + name + " --n 64`."]
    else:
        lines = ["", "## Use", "", f"`ebdiff sample {name} --n 64 [--class K ...] [--guidance S]` (one grid row per "
                 "class); `ebdiff.load('" + name + "')` gives the model, called as `model(x, t, class_labels).sample`."]
        if classes is not None:
            lines += ["", f"Class-conditional on {classes} classes; class {classes} is the null class "
                      "of classifier-free guidance."]
        elif component == "transformer":
            lines += ["", "Unconditional: a DiT always takes a label, here 1 (its null class) in every call."]
        if facts.get("autoencoder") and facts.get("pipeline") != "DiTPipeline":
            lines += ["", f"A latent model: its samples are decoded by the autoencoder at `{facts['autoencoder']}` "
                      "(the run's `model.autoencoder`), which must be there to sample."]
    pipe, dense = facts.get("pipeline"), kind != "ta-eb" and facts["phases"][0] == "dense"
    if pipe == "DDIMPipeline":
        return lines + ["", f"A dense model also loads in plain diffusers: `DDIMPipeline.from_pretrained('{name}')`."]
    n = classes or 1
    if pipe == "DiTPipeline":
        guide = [] if n == 1000 else ["", f"`guidance_scale` must stay 1: DiTPipeline's unconditional branch is class "
                                          f"1000 (ImageNet's null class), this model's is {n} (`ebdiff sample "
                                          "--guidance` guides any model)."]
        return lines + ["", "A dense latent DiT is also a diffusers `DiTPipeline` folder (plain diffusers; it decodes "
                        f"with `{VAE}/`):", "", "```python", "from diffusers import DiTPipeline", "",
                        f"pipe = DiTPipeline.from_pretrained('{name}')",
                        f"images = pipe(class_labels=[{', '.join(str(k % n) for k in range(4))}], "
                        f"guidance_scale={4.0 if n == 1000 else 1.0}, num_inference_steps=50).images", "```", *guide]
    if component == "transformer" and dense and not facts.get("autoencoder"):
        c, h, w = facts["shape"]
        return lines + ["", "Not a diffusers `DiTPipeline` folder: DiTPipeline always decodes its result with a `vae` "
                        "and a pixel model has none. Its parts load in plain diffusers:", "", "```python",
                        "import torch",
                        "from diffusers import DDIMScheduler, DiTTransformer2DModel", "",
                        f"model = DiTTransformer2DModel.from_pretrained('{name}', subfolder='transformer')",
                        f"sched = DDIMScheduler.from_pretrained('{name}', subfolder='scheduler')",
                        "sched.set_timesteps(50)",
                        f"x, y = torch.randn(16, {c}, {h}, {w}), torch.full((16,), {0 if classes else 1})"
                        + ("  # a class; the null class is " + str(n) if classes else "  # the null class"),
                        "with torch.no_grad():", "    for t in sched.timesteps:",
                        "        eps = model(x, t.expand(16), class_labels=y).sample",
                        "        x = sched.step(eps, t, x, use_clipped_model_output=True).prev_sample  # as ebdiff's "
                        "clip_x0",
                        "images = (x / 2 + 0.5).clamp(0, 1)", "```"]
    member = "region-*" if kind == "ta-eb" else kind
    return lines + ["", f"`{member}/config.json` describes the dense preset; the pruned widths come from `plan.json`, "
                    "which `ebdiff.load` replays: plain diffusers cannot load this model."]


def write_member(folder: Path, model: nn.Module, meta: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    keep = ("preset", "dropout", "num_classes", "phase", "plan", "iteration", "image_shape", "checkpoint", "latent")
    built = {k: meta[k] for k in ("backbone", "model_config") if k in meta}  # a model.config or an adapted preset
    (folder / PLAN_FILE).write_text(json.dumps({"format": EXPORT_FORMAT, **{k: meta.get(k) for k in keep}, **built},
                                               indent=1, default=ck.json_default) + "\n")
    (folder / "config.json").write_text(model.to_json_string())


def write_pipeline_index(folder: Path, pipeline: str, component: str, model: nn.Module, meta: dict, sched) -> None:
    """model_index.json: plain diffusers loads the folder as `pipeline`. A DiTPipeline also gets `vae/`, the
    run's autoencoder with `scaling_factor` set to the run's latent scale (DiTPipeline divides the latents by
    it before decoding, as ebdiff does by the scale)."""
    import diffusers

    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", type(sched).__name__], component: ["diffusers", type(model).__name__]}
    if pipeline == "DiTPipeline":
        ae = load_autoencoder(meta["latent"]["autoencoder"], meta["preset"]).model
        ae.register_to_config(scaling_factor=float(meta["latent"]["scale"]))
        ae.save_pretrained(str(folder / VAE), safe_serialization=True)
        index[VAE] = ["diffusers", type(ae).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def export(run: str | Path, out: str | Path, ema: bool = True, formats: Sequence[str] = ("folder",)) -> Path:
    """Write a self-contained model folder of a run (see the module doc); atomic: built under a temporary name
    beside `out`, then renamed. Refuses an `out` that exists and is not an empty folder. formats: besides the
    folder, `onnx` and/or `torch-export` files in each member folder (`export_formats`)."""
    import diffusers

    from .. import __version__
    from . import export_formats as xf

    run, out = Path(run), Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise CheckpointError(f"--out {out} already exists and is not an empty folder: choose another")
    extra = xf.check_formats(formats)
    got = read_models(run, ema)
    cfg = as_config(run)
    kind = ModelSpec.from_meta(got.metas[0]).backbone.component if got.regions is None else "ta-eb"
    if kind not in EXPORT_KINDS:
        raise ConfigError(f"backbone component '{kind}' is not an export kind ebdiff reads back "
                          f"({', '.join(EXPORT_KINDS)}): add it to runs.folders.EXPORT_KINDS")
    members = [kind] if got.regions is None else [f"region-{k}" for k in range(len(got.models))]
    facts = export_facts(run, got, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for name, model, meta in zip(members, got.models, got.metas):
            write_member(tmp / name, model, meta)
            xf.write_files(tmp / name, model, extra)
        sched = scheduler("ddim", cfg)
        sched.save_config(str(tmp / "scheduler"))
        if facts["pipeline"]:  # plain diffusers loads this folder
            write_pipeline_index(tmp, facts["pipeline"], kind, got.models[0], got.metas[0], sched)
        if kind == "ta-eb":
            (tmp / REGIONS_FILE).write_text(json.dumps(regions_record(got.regions, got.route, members), indent=2)
                                            + "\n")
        (tmp / "config.yaml").write_text(dump_yaml(cfg))
        (tmp / MANIFEST).write_text(json.dumps({
            "format": EXPORT_FORMAT, "kind": kind, "weights": got.weights, "members": members, "route": got.route,
            "source": {"path": facts["source"], "checkpoints": [m["checkpoint"] for m in got.metas]},
            "ebdiff_version": __version__, "diffusers_version": diffusers.__version__,
            "size": {"params": facts["params"], "macs": facts["macs"]}, **xf.manifest_entries(got, members, extra)},
            indent=2, default=ck.json_default) + "\n")
        (tmp / "README.md").write_text(model_card(out.name, kind, facts) + xf.card(out.name, got, members, extra))
        os.chmod(tmp, ck.usual_mode(folder=True))  # mkdtemp's folder is private; an export is meant to be shared
        os.replace(tmp, out)  # onto a missing or empty folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

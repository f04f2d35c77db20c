"""`ebdiff eval`: sample a run, measure quality (FD-<dataset> / FID, KID), size and speed -> eval.json."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ..backbones import (
    autocast_eps,
    backbone_of,
    count_macs_params,
    eps_fn,
    fixed_batch_eps,
    model_classes,
)
from ..config import Config, DiffusionConfig, SampleConfig
from ..core.diffusion import Schedule
from ..core.regions import RegionRouter
from ..core.sampling import generate, sampler_timesteps, visited_timesteps
from ..data.datasets import DATASETS, get_dataset, load_dataset
from ..data.latents import image_size
from ..errors import ConfigError
from ..files import atomic_save, atomic_write_json
from ..runs.folders import require_checkpoints, run_config
from ..runs.interop import read_models

COMPILE_MIN_CALLS = 2000  # sample.compile=auto compiles on a GPU from this many eps-model calls on


def sample_compile_mode(scfg: SampleConfig, device_type: str) -> str:
    """sample.compile resolved for a job: `auto` is reduce-overhead (CUDA graphs) on a GPU when the job
    is long enough to repay compilation (batches x steps >= COMPILE_MIN_CALLS), none otherwise."""
    if scfg.compile != "auto":
        return scfg.compile
    calls = -(-scfg.n // scfg.batch_size) * scfg.steps
    return "reduce-overhead" if device_type == "cuda" and calls >= COMPILE_MIN_CALLS else "none"


SAMPLE_OPTIONS = ("n", "steps", "sampler", "spacing", "eta", "seed", "batch_size", "clip_x0", "mixed_precision",
                  "compile", "guidance", "classes")  # the sample.* settings a command may override
REFERENCE_MAX = 50_000  # reference images of a dataset streamed from files (balanced over its classes)


def sample_run(path: Path, out: Path | None = None, device: str = "cpu", ema: bool = True, route: str | None = None,
               progress: bool = True, **overrides) -> dict:
    """Sample a run (dense, ticket or TA-EB) with its own sampler settings (overrides: sample.* values,
    None = the run's), write a PNG grid and the uint8 images as .npz; returns the sampling info with
    the two paths (`grid`, `images`). Default grid: RUN/samples_<sampler><steps>.png."""
    from ..core.sampling import to_uint8
    from .report import save_grid

    x, info = sample_checkpoint(Path(path), device, ema=ema, progress=progress, route=route, **overrides)
    s = info["sampler"]
    imgs = to_uint8(x)
    grid = Path(out) if out else Path(path) / f"samples_{s['sampler']}{s['steps']}.png"
    save_grid(imgs, grid, nrow=info.pop("row", None))  # a class-conditional run: one row per class

    def _write(p):
        with open(p, "wb") as f:
            np.savez_compressed(f, images=imgs)

    atomic_save(grid.with_suffix(".npz"), _write)
    info.pop("meta", None)
    return dict(info, grid=grid, images=grid.with_suffix(".npz"))


def run_sample_config(cfg: Config, **overrides) -> tuple[DiffusionConfig, SampleConfig]:
    """The run's diffusion and sampler settings, with the given (non-None) sampler settings replaced."""
    dcfg = cfg.diffusion
    scfg = replace(cfg.sample, **{k: v for k, v in overrides.items() if v is not None})
    if scfg.sampler == "ddpm":
        scfg = replace(scfg, steps=dcfg.timesteps)
    if not 0 < scfg.steps <= dcfg.timesteps:
        raise ConfigError(f"--steps must be in 1..{dcfg.timesteps}; got {scfg.steps}")
    for name in ("n", "batch_size"):
        if getattr(scfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive; got {getattr(scfg, name)}")
    if scfg.eta < 0:
        raise ConfigError(f"--eta must be >= 0; got {scfg.eta}")
    sampler_timesteps(scfg.sampler, dcfg.timesteps, scfg.steps, scfg.spacing)  # a spacing it cannot visit stops here
    return dcfg, scfg


def load_for_sampling(path: Path, device: str, ema: bool = True, route: str | None = None):
    """(eps-model callable, meta, size_fn, first model) for a run, a checkpoint, a TA-EB run (a RegionRouter)
    or an exported folder. size_fn(scfg, dcfg) -> {params, macs}: weighted over the visited timesteps for
    TA-EB. ema=False: the online weights; True: the EMA weights (an export: the one set it holds)."""
    got = read_models(Path(path), None if ema else False, device)
    sizes = [count_macs_params(m) for m in got.models]
    if got.regions is not None:
        router = RegionRouter([eps_fn(m) for m in got.models], got.regions, route or got.route)

        def size_fn(scfg, dcfg):
            ts = visited_timesteps(scfg, dcfg.timesteps)
            return {"params": router.regions.weighted([p for _, p in sizes], ts, router.rule),
                    "macs": router.regions.weighted([m for m, _ in sizes], ts, router.rule),
                    "per_region": [{"params": p, "macs": m} for m, p in sizes], "route": router.rule}

        meta = dict(got.metas[0], phase="ta-eb", checkpoint=[m["iteration"] for m in got.metas], weights=got.weights)
        return router, meta, size_fn, got.models[0]
    macs, params = sizes[0]
    meta = dict(got.metas[0], weights=got.weights)
    return eps_fn(got.models[0]), meta, (lambda scfg, dcfg: {"params": params, "macs": macs}), got.models[0]


def per_model(fn, wrap):
    """wrap(fn), or for a TA-EB router wrap each region model and keep the router outermost (the
    samplers route by the step's Python int through it)."""
    return fn.map(wrap) if isinstance(fn, RegionRouter) else wrap(fn)


def compile_eps(fn, mode: str):
    """torch.compile the UNet behind an eps callable of `backbones.eps_fn`."""
    return eps_fn(torch.compile(fn.model, mode=None if mode == "default" else mode))


def sample_model(fn, shape: tuple[int, int, int], dcfg: DiffusionConfig, scfg: SampleConfig, device,
                 progress: bool = True, compile_cache: str | None = None, *, labels: torch.Tensor | None = None,
                 null_class: int | None = None, decode=None) -> tuple[torch.Tensor, dict]:
    """Images in [-1, 1] from an eps callable (a model's `eps_fn`, or a RegionRouter) with the sampler
    settings `scfg`: bf16 autocast and compilation as `scfg` resolves them on this device. Returns the
    images and {precision, compile, seconds, images_per_s}. compile_cache: the run's train.compile_cache
    (a compiled sampler loads and saves its artifacts there; None: not used). labels, null_class: a
    class-conditional model's labels of the n samples and its null class (classifier-free guidance with
    `scfg.guidance`); decode: a latent model's decoder (latents -> images), timed with the sampling."""
    dev_type = torch.device(device).type
    compile_mode = sample_compile_mode(scfg, dev_type)
    bf16 = scfg.mixed_precision == "bf16" or (scfg.mixed_precision == "auto" and dev_type == "cuda")
    batch = min(scfg.batch_size, scfg.n) * (1 if scfg.guidance is None or labels is None else 2)  # CFG: doubled
    cache, key = None, None
    if compile_mode != "none" and compile_cache is not None:  # the run's compile cache serves sampling too
        from ..training.compile_cache import CompileCache, cache_key

        cache = CompileCache.from_setting(compile_cache, device)
        if cache is not None and cache.activate():
            models = [m.model for m in fn.models] if isinstance(fn, RegionRouter) else [fn.model]
            key = cache_key(models, {"job": "sample", "compile": compile_mode, "bf16": bf16}, device,
                            {"batch": batch, "shape": list(shape), "conditional": labels is not None})
            cache.load_artifacts(key)

    def fast(m):  # the compiled UNet inside, bf16 autocast around it, padding to one shape outermost
        if compile_mode != "none":
            m = compile_eps(m, compile_mode)
        if bf16:
            m = autocast_eps(m, dev_type)
        if compile_mode != "none":
            m = fixed_batch_eps(m, batch)
        return m

    fn = per_model(fn, fast)
    t0 = time.perf_counter()
    x = generate(fn, scfg.n, shape, Schedule.from_config(dcfg), sampler=scfg.sampler, steps=scfg.steps,
                 spacing=scfg.spacing, batch_size=scfg.batch_size, seed=scfg.seed, device=device, progress=progress,
                 eta=scfg.eta, variance=scfg.variance, clip_x0=scfg.clip_x0, labels=labels,
                 guidance=scfg.guidance, null_class=null_class, clamp=decode is None)
    if decode is not None:
        x = decode(x, scfg.batch_size)  # latents -> images in [-1, 1]
    if dev_type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if key is not None:
        cache.save_artifacts(key)
    return x, {"precision": "bf16" if bf16 else "fp32", "compile": compile_mode, "seconds": dt,
               "images_per_s": scfg.n / dt}


def model_shape(meta: dict, model) -> tuple[int, int, int]:
    return tuple(meta.get("image_shape") or backbone_of(model).sample_shape(model))


def sample_checkpoint(path: Path, device: str, ema: bool = True, progress: bool = True, route: str | None = None,
                      **overrides) -> tuple[torch.Tensor, dict]:
    """Images in [-1, 1] from a run/checkpoint/TA-EB run with its own sampler settings (overridable)."""
    cfg = run_config(path)
    dcfg, scfg = run_sample_config(cfg, **overrides)
    fn, meta, size_fn, model = load_for_sampling(path, device, ema, route)
    inputs, row = sampling_inputs(model, meta, scfg, device, path)
    x, speed = sample_model(fn, model_shape(meta, model), dcfg, scfg, device, progress, cfg.train.compile_cache,
                            **inputs)
    info = {"sampler": asdict(scfg), **speed, "checkpoint": meta["checkpoint"], "weights": meta["weights"],
            "size": size_fn(scfg, dcfg), "meta": meta, "row": row}
    if inputs["labels"] is not None:
        info["labels"] = inputs["labels"].tolist()
    return x, info


def sampling_inputs(model, meta: dict, scfg: SampleConfig, device, where) -> tuple[dict, int | None]:
    """What `sample_model` needs besides the eps callable for a model with checkpoint meta `meta`: the labels
    and null class of a class-conditional model, the decoder of a latent one (as keyword arguments), and the
    grid's row length (one row per class). `where` names the model in error lines."""
    classes = model_classes(model)
    labels, row = sample_labels(classes, scfg, where)
    latent, decode = meta.get("latent"), None
    if latent is not None:  # its autoencoder and scale, recorded in its checkpoints
        from ..data.latents import LatentDecoder

        decode = LatentDecoder(latent, device, meta.get("preset") or "")
    return {"labels": labels, "null_class": classes, "decode": decode}, row


def sample_labels(classes: int | None, scfg: SampleConfig, path: Path) -> tuple[torch.Tensor | None, int | None]:
    """(class labels of the n samples, grid row length) of a class-conditional model: `sample.classes` (or
    all) in turn, one row per class; (None, None) for an unconditional one, which refuses classes and guidance."""
    from ..core.sampling import class_rows

    if classes is None:
        if scfg.classes or scfg.guidance is not None:
            raise ConfigError(f"--class / --guidance: {path} is an unconditional model (trained without "
                              "model.num_classes)")
        return None, None
    bad = [k for k in scfg.classes or [] if not 0 <= k < classes]
    if bad:
        raise ConfigError(f"--class {bad[0]}: {path} has classes 0..{classes - 1}")
    return class_rows(classes, scfg.n, scfg.classes)


def reference_rows(data, n: int):
    """The reference images of a dataset streamed from files: n of them, the same number from each class
    (as Diff-Pruning's FID script), decoded batch by batch (`data.ImageRows`)."""
    from ..data.datasets import ImageRows, balanced_indices

    labels = data.labels if data.labels is not None else torch.full((len(data),), -1, dtype=torch.long)
    return ImageRows(data.files_dataset, balanced_indices(labels, n))


class Scorer:
    """One quality metric of a run, ready to score images: FD-<dataset> on the features of ebdiff's cached
    dataset classifier, or Inception FID, against the data the run trained on (its data.limit too; a
    dataset streamed from files: a class-balanced sample of it, read batch by batch).
    The reference features are computed once (and cached on disk), so scoring many points of a
    training curve costs only the samples' features. `kind`: "fd" or "fid"."""

    def __init__(self, cfg: Config, kind: str = "fd", device: str = "cpu", inception_weights: str | None = None,
                 classifier_epochs: int | None = None, progress: bool = True, train=None, test=None):
        from .metrics import ClassifierFeatures, InceptionFeatures, reference_stats

        dataset = get_dataset(cfg.data.name)
        if kind == "fd" and not dataset.labelled:
            labelled = [d.name for d in DATASETS.values() if d.labelled]
            raise ConfigError(f"--metric fd needs a labelled dataset ({', '.join(labelled)}); "
                              f"{cfg.data.name} has none: use --metric fid")
        self.cfg, self.kind, self.progress = cfg, kind, progress
        size = image_size(cfg.data, cfg.model)
        self.train = train or load_dataset(replace(cfg.data, split="train"), size, progress=progress)
        self.test = test
        if kind == "fd":
            self.test = test or load_dataset(replace(cfg.data, split="test"), size, progress=progress)
            self.extractor = ClassifierFeatures.load_or_train(
                cfg.data.name, (self.train.images, self.train.labels), (self.test.images, self.test.labels),
                device=device, epochs=classifier_epochs, progress=progress, metric=dataset.fd_metric)
        else:
            self.extractor = InceptionFeatures(inception_weights, device=device)
        ref = self.train.images
        if ref is None:
            ref = reference_rows(self.train, cfg.data.limit or REFERENCE_MAX)
        self.reference = f"{cfg.data.name} train ({len(ref)} images)"
        _, _, self.ref_features = reference_stats(self.extractor, self.extractor.name, ref,
                                                  f"{cfg.data.name}-train", progress=progress)

    @property
    def name(self) -> str:
        return self.extractor.metric

    def __call__(self, x: torch.Tensor) -> dict:
        """{name, extractor, value, kid, kid_std} of images x (float in [-1, 1] or uint8)."""
        from .metrics import fd_from_features, kid

        feats = self.extractor(x, progress=self.progress)
        k_mean, k_std = kid(feats, self.ref_features, subsets=50, subset_size=min(1000, len(feats)))
        return {"name": self.extractor.metric, "extractor": self.extractor.name,
                "value": fd_from_features(feats, self.ref_features), "kid": k_mean, "kid_std": k_std,
                "reference": self.reference}

    def floor(self) -> dict:
        """FD and KID of the test split against the training split: the best a model can score (FD only)."""
        from .metrics import fd_from_features, kid, reference_stats

        _, _, test_feats = reference_stats(self.extractor, self.extractor.name, self.test.images,
                                           f"{self.cfg.data.name}-test", progress=self.progress)
        return {"floor_train_vs_test": fd_from_features(test_feats, self.ref_features),
                "floor_kid": kid(test_feats, self.ref_features, subsets=50,
                                 subset_size=min(1000, len(test_feats)))[0]}


def evaluate_run(run: Path, *, n: int = 10_000, metric: str = "fd", steps: int | None = None,
                 batch_size: int | None = None, device: str = "cpu", inception_weights: str | None = None,
                 data_root: str | None = None, classifier_epochs: int | None = None, seed: int | None = None,
                 mixed_precision: str | None = None, compile: str | None = None, progress: bool = True) -> dict:
    run = Path(run)
    cfg = run_config(run)
    require_checkpoints(run)  # before the classifier and the reference statistics
    if data_root:
        cfg.data.root = data_root
    kinds = ("fd", "fid") if metric == "both" else (metric,)
    scorers, train, test = [], None, None
    for kind in kinds:  # the FD check (a labelled dataset) comes first, before anything is loaded
        sc = Scorer(cfg, kind, device, inception_weights, classifier_epochs, progress, train=train, test=test)
        train, test = sc.train, sc.test
        scorers.append(sc)
    x, info = sample_checkpoint(run, device, progress=progress, n=n, steps=steps, batch_size=batch_size, seed=seed,
                                mixed_precision=mixed_precision, compile=compile)
    meta, size = info.pop("meta"), info["size"]
    info.pop("labels", None)
    info.pop("row", None)
    result = {"run": str(run), "checkpoint": meta["checkpoint"], "iteration": meta["iteration"],
              "phase": meta.get("phase"), "params": size["params"], "macs": size["macs"], "n_samples": n,
              "sampling": info, "metrics": {}}
    for kind, sc in zip(kinds, scorers):
        m = sc(x)
        if kind == "fd":
            m["classifier_test_accuracy"] = sc.extractor.info["test_accuracy"]
            m.update(sc.floor())
            m["note"] = f"{sc.name} uses ebdiff's own {cfg.data.name} classifier features; it is not Inception FID"
        result["metrics"][kind] = m
    from ..core.sampling import to_uint8
    from .report import save_grid

    save_grid(to_uint8(x[:64]), run / "samples_eval.png")  # the report's side-by-side grids (Figure 5)
    summ = run / "summary.json"
    if (run / "taeb.json").is_file():
        a = json.loads((run / "taeb.json").read_text())
        result["training_time_s"] = {"train_total": a["taeb_train_s"], "branches": [b["train_s"] for b in a["branches"]]}
        result["size_per_region"] = size.get("per_region")
        result["size_by_timesteps"] = (a.get("weightings") or {}).get("timesteps")
    elif summ.is_file():
        s = json.loads(summ.read_text())
        result["training_time_s"] = s.get("time_s")
        result["iterations"] = {"dense": s.get("dense_iterations"), "ticket": s.get("ticket_iterations")}
    atomic_write_json(run / "eval.json", result)
    return result


def one_line(r: dict) -> str:
    parts = [f"{Path(r['run']).name}: {r['params'] / 1e6:.2f}M params, {r['macs'] / 1e9:.3f}G MACs"]
    for m in r["metrics"].values():
        s = f"{m['name']} {m['value']:.3f} (KID {m['kid']:.4f})"
        if "floor_train_vs_test" in m:
            s += f", floor {m['floor_train_vs_test']:.3f}"
        parts.append(s)
    parts.append(f"{r['n_samples']} samples at {r['sampling']['images_per_s']:.1f} img/s")
    return "; ".join(parts)


def format_sample_info(info: dict, device) -> str:
    """`ebdiff sample`'s lines: the classes, the sampler and its speed, the two files written."""
    s = info["sampler"]
    comp = "" if info["compile"] == "none" else f", compile={info['compile']} (included)"
    lines = []
    if info.get("labels") is not None:
        guide = "no guidance" if s["guidance"] is None else f"guidance {s['guidance']}"
        lines.append(f"classes {', '.join(str(k) for k in sorted(set(info['labels'])))} ({guide}; one grid row per "
                     "class)")
    lines.append(f"{s['n']} samples ({s['sampler']}, {s['steps']} steps, "
                 f"{'all' if s['sampler'] == 'ddpm' else s['spacing']} spacing, {info['weights']} weights of "
                 f"{info['checkpoint']}, {info['precision']}{comp}) in {info['seconds']:.1f} s = "
                 f"{info['images_per_s']:.1f} images/s on {device}")
    lines.append(f"grid   {info['grid']}\nimages {info['images']}")
    return "\n".join(lines)

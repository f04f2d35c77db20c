"""Command line: thin wrappers that parse, call the library and print a summary."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .errors import ConfigError, EbdiffError

DEMO_CONFIG = "demo.yaml"  # bundled (config.bundled_configs)
DEMO_COMPARE = "demo_compare.yaml"  # bundled, in experiments/
DEMO_LATENT_CONFIG = "demo_latent.yaml"
DEMO_AUTOENCODER_STEPS = 600


def _fmt(x: float | None) -> str:
    from .models import format_count

    return "-" if x is None else format_count(x)


# ---------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import latest_checkpoint, newest_run
    from .config import load_config
    from .trainer import train

    if args.resume:
        run_dir = newest_run(Path(args.resume))
        if run_dir is None:
            raise ConfigError(f"--resume: {args.resume} is not an ebdiff run folder (no config.yaml) and holds no "
                              "run with a checkpoint")
        if run_dir != Path(args.resume):
            print(f"resuming the newest run under {args.resume}: {run_dir}")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--out {run_dir} is a file, not a run folder")
        if latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"{run_dir} already holds a run: pass --resume {run_dir} to continue it, "
                              "or choose another --out")
    _print_train_summary(train(cfg, run_dir, resume=bool(args.resume)))
    return 0


def _print_train_summary(s: dict) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    t = s["time_s"]
    print("\n== ebdiff train summary ==")
    print(f"run folder         {s['run_dir']}")
    print(f"iterations         {s['iterations']} (dense {s['dense_iterations']}, ticket {s['ticket_iterations']})")
    d = s.get("dense") or {}
    print(f"dense model        {_fmt(d.get('params'))} params, {_fmt(d.get('macs'))} MACs")
    info = s.get("ticket_info")
    if s.get("ticket") and info is not None and info.get("found", True):
        tk = s["ticket"]
        print(f"ticket             {_fmt(tk['params'])} params, {_fmt(tk['macs'])} MACs "
              f"(drawn at iteration {info['iteration']}, check {info['check']}, "
              f"max distance {info['max_distance'] if info['max_distance'] is None else round(info['max_distance'], 4)})")
        print(f"search cost        {info['search_seconds']:.1f} s dense training + checks, "
              f"{info['check_seconds_mean'] * 1e3:.1f} ms per check (mean)")
    elif info is not None and not info.get("found", True):
        print(f"ticket             none drawn by iteration {info['iteration']}")
    pf = s.get("pruned_from")
    if pf:
        tk = s["ticket"]
        print(f"pruned model       {_fmt(tk['params'])} params, {_fmt(tk['macs'])} MACs ({pf['method']}, "
              f"{pf['criterion']} p={pf['ratio']}, from {pf['run']} at iteration {pf['iteration']})")
        print(f"training time      {t['train_total']:.1f} s = dense run {t['dependency_s']:.1f} + prune "
              f"{t['extract_s']:.1f} + {'training' if pf['reinit'] else 'fine-tuning'} {t['sparse_s']:.1f}; "
              f"wall {t['wall_s']:.1f} s")
    else:
        print(f"training time      {t['train_total']:.1f} s (dense {t['dense_s']:.1f}, checks {t['check_s']:.1f}, "
              f"extract {t['extract_s']:.1f}, ticket {t['sparse_s']:.1f}); wall {t['wall_s']:.1f} s")
    if s.get("stopped") == "max_seconds":
        print(f"stopped by         train.max_seconds (its own training time, {t['own_total']:.1f} s)")
    if t.get("eval_s"):
        print(f"evaluation         {t['eval_s']:.1f} s during training (not counted as training; points in "
              f"metrics.jsonl)")
    print(f"device             {s['device']} x {s['processes']}")


# ---------------------------------------------------------------------- sample
def cmd_sample(args: argparse.Namespace) -> int:
    from .distributed import resolve_device
    from .evaluate import SAMPLE_OPTIONS, sample_run

    from .interop import SAMPLER_PREFIX

    if args.scheduler:
        if args.sampler:
            raise ConfigError("--sampler (ebdiff's own) and --scheduler (diffusers') exclude each other: give one")
        args.sampler = SAMPLER_PREFIX + args.scheduler
    device = resolve_device(args.device)
    info = sample_run(Path(args.run), args.out, device, ema=not args.no_ema, route=args.route,
                      **{k: getattr(args, k) for k in SAMPLE_OPTIONS})
    s = info["sampler"]
    comp = "" if info["compile"] == "none" else f", compile={info['compile']} (included)"
    if info.get("labels") is not None:
        guide = "no guidance" if s["guidance"] is None else f"guidance {s['guidance']}"
        print(f"classes {', '.join(str(k) for k in sorted(set(info['labels'])))} ({guide}; one grid row per class)")
    print(f"{s['n']} samples ({s['sampler']}, {s['steps']} steps, "
          f"{'all' if s['sampler'] == 'ddpm' else s['spacing']} spacing, {info['weights']} weights of "
          f"{info['checkpoint']}, {info['precision']}{comp}) in {info['seconds']:.1f} s = "
          f"{info['images_per_s']:.1f} images/s on {device}")
    print(f"grid   {info['grid']}\nimages {info['images']}")
    return 0


# ---------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from .interop import export, read_manifest

    out = export(Path(args.run), Path(args.out), ema=not args.no_ema, formats=args.format)
    man = read_manifest(out)
    size = man["size"]
    print(f"exported {args.run} ({man['kind']}, {len(man['members'])} model{'s' * (len(man['members']) > 1)}, "
          f"{man['weights']} weights, {_fmt(size['params'])} params, {_fmt(size['macs'])} MACs) to {out}/")
    print(f"load it with ebdiff.load('{out}'); model card: {out / 'README.md'}")
    return 0


# ---------------------------------------------------------------------- ta-eb
def cmd_taeb(args: argparse.Namespace) -> int:
    from .checkpoint import RunLock
    from .config import load_config
    from .taeb import finalize, format_accounting, launch, preflight, region_set

    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"--resume: {run} is not an ebdiff TA-EB run folder (no config.yaml)")
        cfg = load_config(run / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        run = Path(args.out or f"runs/taeb-{time.strftime('%Y%m%d-%H%M%S')}")
        if (run / "regions.json").is_file() and os.environ.get("WORLD_SIZE", "1") == "1":
            raise ConfigError(f"{run} already holds a TA-EB run: pass --resume {run} to continue it")
    region_set(cfg)  # a bad region set stops here, before anything is written
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        preflight(cfg)
    created = rank0 and not run.exists()
    try:
        with RunLock(run, "ta-eb") if rank0 else contextlib.nullcontext():
            launch(cfg, run)
            if not rank0:
                return 0
            a = finalize(run)
    except BaseException:
        if created and not any(run.glob("region-*/checkpoints/ckpt-*")):
            shutil.rmtree(run, ignore_errors=True)  # a failed start leaves no half-made run folder
        raise
    print("\n== ebdiff ta-eb summary ==")
    print(format_accounting(a))
    print(f"run folder {run}: regions.json, region-*/, taeb.json, hamming_regions.png; "
          f"sample with: ebdiff sample {run}")
    return 0


# ---------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import RunLock
    from .distributed import resolve_device
    from .evaluate import evaluate_run, one_line, require_checkpoints

    if args.n <= 1:
        raise ConfigError("--n must be at least 2")
    require_checkpoints(Path(args.run))
    with RunLock(Path(args.run), "eval"):
        r = evaluate_run(Path(args.run), n=args.n, metric=args.metric, steps=args.steps, batch_size=args.batch_size,
                         mixed_precision=args.mixed_precision, compile=args.compile,
                         device=resolve_device(args.device), inception_weights=args.inception_weights,
                         data_root=args.data_root, classifier_epochs=args.classifier_epochs, seed=args.seed)
    print(one_line(r))
    print(f"eval.json: {Path(args.run) / 'eval.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not ((r / "summary.json").is_file() or (r / "taeb.json").is_file()):
            raise ConfigError(f"{r} has no summary.json or taeb.json: not a finished ebdiff run")
    md = write_report(runs, Path(args.out), Path(args.reference) if args.reference else None, args.target,
                      args.interpolate)
    _print_tables(md)
    if args.target is not None and "## Time to quality" not in md.read_text():
        print(f"--target {args.target:g}: no run has evaluation points during training (train.eval_every), "
              "so there is no time to measure")
    print(f"report: {md}")
    return 0


def _print_tables(md: Path) -> None:
    """The report's tables (the paper-style table, time to quality) with their headings."""
    for block in md.read_text().split("\n\n"):
        if block.startswith("|") or block.startswith("## "):
            print(block + "\n")


# ---------------------------------------------------------------------- experiment
def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import load_experiment, plan, run_experiment

    for k in ("eval_n", "eval_steps"):
        if getattr(args, k) is not None and getattr(args, k) < (2 if k == "eval_n" else 1):
            raise ConfigError(f"--{k.replace('_', '-')} must be {'at least 2' if k == 'eval_n' else 'positive'}")
    exp = load_experiment(args.file, out=args.out, scale=args.scale, target=args.target,
                          interpolate=args.interpolate or None, extra=args.overrides, eval_n=args.eval_n,
                          eval_steps=args.eval_steps)
    only = [x for x in args.only.split(",") if x] if args.only else None
    rows = plan(exp)
    print(f"ebdiff experiment {exp.name}: {len(rows)} methods, scale {exp.scale}, out {exp.out}")
    for r in rows:
        budget = f"iters {r['iters']!s}" + (f", <= {r['max_seconds']:g} s" if r["max_seconds"] else "")
        ev = f"eval every {r['eval_every']}" if r["eval_every"] is not None else ""
        print(f"  {r['name']:<28} {r['kind']:<15} {budget:<30} {ev:<18} {r['status']}")
    if args.dry_run:
        return 0
    from .checkpoint import RunLock

    with RunLock(exp.out, "experiment"):
        rec = run_experiment(exp, only=only, evaluate=not args.no_eval, device=args.device)
    print(f"\n== ebdiff experiment summary ({rec['seconds']:.0f} s) ==")
    if rec["report"]:
        _print_tables(Path(rec["report"]))
        print(f"report: {rec['report']}")
    print(f"record: {exp.out / 'experiment.json'}")
    return 0


# ---------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from .models import build_model, is_latent_preset, preset_names

    presets = [args.preset] if args.preset else list(preset_names())
    for r in args.ratio or []:
        if not 0 < r < 1:
            raise ConfigError(f"--ratio must be in (0, 1); got {r}")
    if args.preset and args.preset not in preset_names():
        raise ConfigError(f"unknown model preset '{args.preset}' (known: {', '.join(preset_names())})")
    import torch

    if args.round < 1:
        raise ConfigError("--round must be >= 1 (1 = the paper's ticket sizes)")
    rows = []
    for name in presets:
        # on the meta device: shapes without memory or arithmetic (the 400M-parameter LDM in seconds). The
        # counts are exact, and so are a ticket's: how many channels each group loses (the ratio rule) fixes
        # its size, whichever channels they are
        with torch.device("meta"):
            model = build_model(name)
        dense = size_row(name, None, model, None)
        rows.append(dense)
        if args.ratio:
            from .pruning import PruningEngine, extract

            eng = PruningEngine(model)
            for r in args.ratio:
                mask = eng.mask_from_scores([torch.zeros(i.size) for i in eng.info], r, args.round)
                rows.append({**size_row(name, r, extract(model, eng.plan(mask)), dense), "round_channels": args.round})
        del model
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<16} {'ratio':>6} {'params':>10} {'MACs':>10} {'MACs x':>8}")
    for r in rows:
        ratio = "dense" if r["ratio"] is None else f"{r['ratio']:.3f}".rstrip("0")
        mx = "" if r["ratio"] is None else f"{1 / r['macs_ratio']:.2f}x"
        print(f"{r['preset']:<16} {ratio:>6} {_fmt(r['params']):>10} {_fmt(r['macs']):>10} {mx:>8}")
    latent = [r for r in rows if is_latent_preset(r["preset"])]
    if latent:
        print("\nLatent presets, the paper's convention (Table 6): the UNet's parameters without the class-embedding "
              "table, and the MACs of a batch of 6 latents, as Diff-Pruning's prune_ldm.py counts them:")
        print(f"{'preset':<16} {'ratio':>6} {'UNet params':>12} {'MACs/latent':>12} {'MACs x 6':>10}")
        for r in latent:
            ratio = "dense" if r["ratio"] is None else f"{r['ratio']:.3f}".rstrip("0")
            print(f"{r['preset']:<16} {ratio:>6} {_fmt(r['unet_params']):>12} {_fmt(r['macs']):>12} "
                  f"{_fmt(r['macs_batch6']):>10}")
        print("(one latent of the preset's size with its class; torch-pruning 1.6 counts GroupNorm and LayerNorm "
              "MACs, the paper's older counter did not: ldm-imagenet256's 599.17G here vs the paper's 598.8G)")
    return 0


def size_row(name: str, ratio: float | None, model, dense: dict | None) -> dict:
    """`ebdiff info`'s row of a model: params and MACs (one image, or one latent with its class); for a latent
    preset also the paper's convention (UNet params without the class table, MACs of 6 latents)."""
    from .models import count_macs_params, is_latent_preset

    macs, params = count_macs_params(model)
    row = {"preset": name, "params": params, "macs": macs, "ratio": ratio}
    if is_latent_preset(name):
        row["unet_params"] = sum(p.numel() for p in model.unet.parameters())
        row["macs_batch6"] = 6 * macs  # the counter's total for a batch is linear in it
    if dense is not None:
        row.update(params_ratio=params / dense["params"], macs_ratio=macs / dense["macs"])
    return row


# ---------------------------------------------------------------------- encode
def cmd_encode(args: argparse.Namespace) -> int:
    """Encode a latent preset's dataset once into its latent cache (what `train` would do first)."""
    from .config import load_config
    from .distributed import resolve_device
    from .latents import latent_training_data
    from .models import is_latent_preset

    cfg = load_config(args.config, args.overrides)
    if not is_latent_preset(cfg.model.preset):
        raise ConfigError(f"model.preset={cfg.model.preset} trains on pixels: encode is for latent presets (ldm-*)")
    t0 = time.perf_counter()
    data = latent_training_data(cfg.data, cfg.model, resolve_device(args.device), progress=True)
    lat, rows = data.latent, data.rows
    n_classes = len(set(data.labels.tolist()) - {-1})
    print(f"latent cache {lat['cache']}: {len(rows)} latents of {'x'.join(map(str, rows.shape))} "
          f"({len(rows.shards)} shards, float16), {n_classes} classes; {lat['kind']} autoencoder {lat['autoencoder']}")
    print(f"latent std {rows.manifest['std']:.4f} (first shard); scale {lat['scale']:.5g} "
          f"(model.latent_scale={cfg.model.latent_scale}); {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import available_modes, default_mode_names, device_label, format_profile, format_table, run_bench
    from .distributed import resolve_device

    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        raise ConfigError(f"--ratios must be comma-separated numbers; got {args.ratios!r}") from None
    if any(not 0 <= r < 1 for r in ratios):
        raise ConfigError("--ratios must lie in [0, 1) (0 = dense)")
    regions = None
    if args.taeb:
        from .config import load_config
        from .taeb import region_set

        regions = region_set(load_config(args.taeb))
        ratios += [r.ratio for r in regions if r.ratio not in ratios]
    if 0.0 not in ratios:
        ratios = [0.0] + ratios
    for k in ("batch", "steps"):
        if getattr(args, k) <= 0:
            raise ConfigError(f"--{k} must be positive")
    if args.profile < 0:
        raise ConfigError("--profile must be 0 (off) or a number of steps")
    if args.round < 1:
        raise ConfigError("--round must be >= 1 (1 = the paper's ticket sizes)")
    device = torch.device(resolve_device(args.device))
    available = available_modes(device, args.compile)
    names = args.modes.split(",") if args.modes else default_mode_names(device, args.compile)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"--modes: unknown {', '.join(unknown)} (available on {device.type}: "
                          f"{', '.join(available)})")
    modes = {n: available[n] for n in names}
    name = device_label(device)
    print(f"ebdiff bench: {args.preset}, batch {args.batch}, {args.steps} timed steps after {args.warmup} "
          f"warm-up, on {name} (torch {torch.__version__})")
    from .checkpoint import atomic_write_json

    def save(rows: list[dict], taeb=None, partial: bool = True) -> None:
        if args.json:
            atomic_write_json(Path(args.json), {"device": name, "torch": torch.__version__, "rows": rows, "taeb": taeb,
                                                "partial": partial, "command": " ".join(sys.argv)})

    from .compile_cache import CompileCache

    rows = run_bench(args.preset, ratios, modes, args.batch, args.steps, args.warmup, device, profile=args.profile,
                     on_row=save, round_channels=args.round, cache=CompileCache.from_setting(args.compile_cache, device))
    table = format_table(rows)
    print(table)
    if args.profile:
        print("\nWhere the step time goes (torch.profiler, " + str(args.profile) + " steps per row):")
        for r in rows:
            print(format_profile(r))
    taeb = None
    if regions is not None:
        from .bench import format_taeb, taeb_rows

        taeb = taeb_rows(rows, regions)
        print("\nTA-EB region tickets (" + args.taeb + "):")
        print(format_taeb(taeb))
    if args.json:
        save(rows, taeb, partial=False)
        print(f"JSON: {args.json}")
    return 0


# ---------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """EB-Diff-Train on Fashion-MNIST at demo scale: search, extract, train the ticket, sample (--latent: in the
    latent space of a small autoencoder, class-conditional; --compare: dense and Early-Bird for equal time)."""
    if args.compare:
        if args.latent:
            raise ConfigError("--compare and --latent are separate demos: choose one")
        return _demo_compare(args)
    if args.seconds is not None:
        raise ConfigError("--seconds is the budget of `ebdiff demo --compare`; the plain demo trains train.iters")
    from .checkpoint import latest_checkpoint
    from .config import bundled_configs, load_config
    from .distributed import resolve_device
    from .evaluate import sample_run
    from .trainer import train

    out = Path(args.out or ("runs/demo-latent" if args.latent else "runs/demo"))
    resume = latest_checkpoint(out) is not None
    config = bundled_configs() / (DEMO_LATENT_CONFIG if args.latent else DEMO_CONFIG)
    cfg = load_config(out / "config.yaml" if resume else config, args.overrides)
    if args.latent and cfg.model.autoencoder is None:
        cfg.model.autoencoder = str(out / "autoencoder")
        _demo_autoencoder(cfg, Path(cfg.model.autoencoder))
    _print_train_summary(train(cfg, out, resume=resume))
    info = sample_run(out, None, resolve_device("auto"), n=cfg.sample.n)
    print(f"{info['sampler']['n']} samples in {info['seconds']:.1f} s: {info['grid']}"
          + (" (one row per class)" if args.latent else ""))
    print(f"\nDemo outputs in {out}/: samples_*.png (grid), hamming.png (mask distances), ticket.json, "
          "metrics.jsonl, checkpoints/")
    return 0


def _demo_compare(args: argparse.Namespace) -> int:
    """Dense and Early-Bird for the same training time each, evaluated during training: the curves, both
    grids, and one line saying which reached the better quality in that time."""
    from .checkpoint import read_json
    from .config import bundled_configs
    from .experiment import load_experiment, run_experiment
    from .quality_curves import verdict

    seconds = 60.0 if args.seconds is None else args.seconds
    if not seconds > 0:
        raise ConfigError(f"--seconds must be positive; got {seconds}")
    extra = [f"train.max_seconds={seconds:g}", f"train.eval_every={seconds / 4:g}s", *args.overrides]
    exp = load_experiment(bundled_configs() / "experiments" / DEMO_COMPARE, out=args.out, extra=extra)
    print(f"ebdiff demo --compare: dense and Early-Bird (magnitude 50%), {seconds:g} s of training each, "
          f"evaluated every {seconds / 4:g} s of training -> {exp.out}")
    rec = run_experiment(exp, device="auto")
    rep = read_json(Path(rec["report"]).parent / "report.json") if rec["report"] else None
    ttq = (rep or {}).get("time_to_quality")
    if not ttq:
        raise ConfigError(f"{exp.out}: no evaluation points were written (train.eval_every)")
    names = [m.name for m in exp.methods]
    methods = {r["name"]: r["method"] for r in rep["runs"]}
    _print_tables(Path(rec["report"]))
    print(f"report: {rec['report']} (quality_curves.png: quality vs training time; samples.png: both grids)")
    print(verdict(ttq, names[0], names[1], rep["metric"], {n: methods.get(n, n) for n in names}))
    return 0


def _demo_autoencoder(cfg, folder: Path) -> None:
    """The latent demo's autoencoder: a small VQ model trained on the demo's images, once (OUT/autoencoder)."""
    if (folder / "config.json").is_file():
        return
    from .data import load_dataset
    from .latents import train_autoencoder
    from .models import preset_shape

    data = load_dataset(cfg.data, preset_shape(cfg.model.preset)[1])
    print(f"training the demo's VQ autoencoder (1x32x32 -> 3x8x8) on {len(data)} images -> {folder}")
    r = train_autoencoder(data.images, folder, steps=DEMO_AUTOENCODER_STEPS)
    print(f"autoencoder: {r['steps']} steps in {r['seconds']:.0f} s, reconstruction MSE {r['reconstruction_mse']:.4f}")


def _sampling_speed_args(p: argparse.ArgumentParser) -> None:
    """--precision and --compile of `sample` and `eval` (default: the run's sample.* settings)."""
    from .config import choices

    p.add_argument("--precision", dest="mixed_precision", choices=choices()["sample.mixed_precision"],
                   help="bf16 autocast for the eps model (default: the run's sample.mixed_precision: auto = bf16 "
                   "on a GPU)")
    p.add_argument("--compile", choices=choices()["sample.compile"],
                   help="torch.compile the eps model (default: the run's sample.compile: auto = reduce-overhead "
                   "with CUDA graphs on a GPU for jobs of 2000+ model calls); compile time counts in images/s")


def _target_args(p: argparse.ArgumentParser) -> None:
    """--target and --interpolate of `report` and `experiment` (time to quality)."""
    p.add_argument("--target", type=float, help="a quality value (e.g. 150 for FD-FMNIST; lower is better): each "
                   "run's training time to reach it, from its evaluation points during training")
    p.add_argument("--interpolate", action="store_true", help="time to a target by linear interpolation between "
                   "the two evaluation points around the crossing (default: the first point at or below it)")


def build_parser() -> argparse.ArgumentParser:
    from .config import choices
    from .interop import SCHEDULERS

    p = argparse.ArgumentParser(prog="ebdiff", description="Early-Bird tickets for cheaper diffusion training")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a dense DDPM, or search + train an Early-Bird ticket (early_bird.ratio=R)")
    t.add_argument("--config", help="YAML config: a path, or a bundled config by name (demo, fmnist, cifar10, ...); "
                   "defaults apply where absent")
    t.add_argument("--out", help="run folder (default runs/<timestamp>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint (a parent or "
                   "experiment folder: its most recently checkpointed run)")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.iters=200 model.preset=tiny")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="DDIM/DDPM samples from a run: PNG grid + .npz of uint8 images")
    s.add_argument("run", help="run folder (newest checkpoint), checkpoint folder, TA-EB run or exported folder")
    s.add_argument("--n", type=int, help="number of images (default: the run's sample.n)")
    s.add_argument("--steps", type=int, help="DDIM steps (default 100)")
    allowed = choices()
    s.add_argument("--sampler", choices=allowed["sample.sampler"],
                   help="ebdiff's ddim (the reference) or ddpm, or diffusers-<scheduler> (default: the run's)")
    s.add_argument("--scheduler", choices=list(SCHEDULERS),
                   help="sample with this diffusers scheduler (the sampler diffusers-<NAME>), configured to the "
                   "run's noise schedule; ddim and euler-ancestral visit --spacing uniform or trailing only")
    s.add_argument("--spacing", choices=allowed["sample.spacing"])
    s.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    s.add_argument("--seed", type=int)
    s.add_argument("--clip-x0", dest="clip_x0", action=argparse.BooleanOptionalAction, default=None,
                   help="DDIM: clip predicted x0 to [-1, 1] (default: the run's sample.clip_x0)")
    s.add_argument("--batch-size", type=int, dest="batch_size")
    _sampling_speed_args(s)
    s.add_argument("--device", default="auto")
    s.add_argument("--no-ema", action="store_true", help="use the online weights instead of the EMA")
    s.add_argument("--out", help="PNG path (default RUN/samples_<sampler><steps>.png)")
    s.add_argument("--route", choices=allowed["taeb.route"], help="TA-EB runs: overlap routing rule")
    s.add_argument("--class", dest="classes", type=int, action="append", metavar="K",
                   help="class-conditional runs: sample class K (repeatable; default: the run's sample.classes, "
                   "else every class, one grid row each)")
    s.add_argument("--guidance", type=float, metavar="S",
                   help="class-conditional runs: classifier-free guidance scale (1 = the conditional model; "
                   "default: the run's sample.guidance)")
    s.set_defaults(fn=cmd_sample)

    ta = sub.add_parser("ta-eb", help="EB-Diff-Train (TA-EB): one ticket per timestep region, branches in parallel")
    ta.add_argument("--config", help="YAML with a 'regions' list: a path, or a bundled config by name (demo_taeb, "
                    "fmnist_taeb, cifar10_taeb)")
    ta.add_argument("--out", help="run folder (default runs/taeb-<timestamp>)")
    ta.add_argument("--resume", metavar="RUN_DIR", help="continue every unfinished branch")
    ta.add_argument("overrides", nargs="*")
    ta.set_defaults(fn=cmd_taeb)

    xp = sub.add_parser("export", help="a self-contained model folder (safetensors, pruning plan, config, model card) "
                                       "that ebdiff.load rebuilds without the run")
    xp.add_argument("run", help="run folder, checkpoint folder or TA-EB run folder")
    xp.add_argument("--out", required=True, help="new folder (must not exist, or be empty)")
    xp.add_argument("--no-ema", action="store_true", help="export the online weights instead of the EMA")
    xp.add_argument("--format", action="append", default=[], metavar="{onnx,torch-export}",
                    help="also write each model as ONNX (model.onnx) or torch.export (model.pt2), to run without "
                         "ebdiff; repeat for both (the folder is always written)")
    xp.set_defaults(fn=cmd_export)

    e = sub.add_parser("eval", help="sample a run and measure FD-<dataset>/FID, KID, params, MACs -> eval.json")
    e.add_argument("run")
    e.add_argument("--n", type=int, default=10_000, help="samples (the paper: 50000 with --metric fid)")
    e.add_argument("--metric", choices=["fd", "fid", "both"], default="fd",
                   help="fd: FD on ebdiff's own dataset-classifier features (offline); fid: Inception (pytorch-fid)")
    e.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    e.add_argument("--batch-size", type=int, dest="batch_size")
    _sampling_speed_args(e)
    e.add_argument("--seed", type=int)
    e.add_argument("--device", default="auto")
    e.add_argument("--inception-weights", help=f"local {'pt_inception-2015-12-05-6726825d.pth'}")
    e.add_argument("--data-root", help="dataset root (default: the run's data.root)")
    e.add_argument("--classifier-epochs", type=int, default=None,
                   help="epochs of the feature classifier (default: its recipe: 3 for the grey CNN, 16 for ResNet-9; trained once, cached)")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("experiment", help="run a comparison table (configs/experiments/*.yaml): train, skip, "
                                          "resume, evaluate, report")
    x.add_argument("file", help="experiment YAML: a path, or a bundled experiment by name (cifar10_table4, "
                   "fmnist_table4_cpu, ...)")
    x.add_argument("--out", help="output folder (default: the file's 'out')")
    x.add_argument("--scale", type=float, help="iteration scale factor (default: the file's 'scale')")
    x.add_argument("--only", help="comma-separated method names to run (their dense sources must be finished)")
    x.add_argument("--dry-run", action="store_true", help="print the plan and each method's status, train nothing")
    x.add_argument("--no-eval", action="store_true", help="skip the final evaluation (eval.json; the report's "
                   "quality column then shows each run's last evaluation point during training, if any)")
    x.add_argument("--eval-n", type=int, help="samples of the final evaluation (default: the file's eval.n)")
    x.add_argument("--eval-steps", type=int, help="sampling steps of the final evaluation (default: the file's)")
    x.add_argument("--device", default="auto", help="device for evaluation")
    _target_args(x)
    x.add_argument("overrides", nargs="*", help="section.key=value applied to every method after the file's "
                   "(e.g. model.preset=tiny for a dry run)")
    x.set_defaults(fn=cmd_experiment)

    r = sub.add_parser("report", help="Markdown report with the paper-style table and figures")
    r.add_argument("runs", nargs="+", help="run folders (eval them first for the quality column)")
    r.add_argument("--out", default="report", help="output folder (report.md + PNGs)")
    r.add_argument("--reference", help="dense run whose training time defines speed-up 1.0x (default: the first dense run)")
    _target_args(r)
    r.set_defaults(fn=cmd_report)

    i = sub.add_parser("info", help="parameters and MACs of presets (and of pruned tickets with --ratio)")
    i.add_argument("--preset", help="one preset (default: all)")
    i.add_argument("--ratio", type=float, action="append", help="pruning ratio to size (repeatable)")
    i.add_argument("--round", type=int, default=1, metavar="N",
                   help="round the tickets' surviving channels to multiples of N (early_bird.round_channels)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    en = sub.add_parser("encode", help="latent presets: encode the dataset once into the latent cache (train does it "
                                      "too, if missing)")
    en.add_argument("--config", help="YAML config of a latent preset (e.g. imagenet_ldm, demo_latent)")
    en.add_argument("--device", default="auto")
    en.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.autoencoder=PATH data.root=DIR")
    en.set_defaults(fn=cmd_encode)

    b = sub.add_parser("bench", help="training-step throughput: dense vs tickets, reference mode vs fast path")
    b.add_argument("--preset", default="cifar10")
    b.add_argument("--ratios", default="0,0.3,0.5", help="comma-separated pruning ratios; 0 = dense")
    b.add_argument("--batch", type=int, default=128)
    b.add_argument("--steps", type=int, default=50, help="timed steps per row")
    b.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    b.add_argument("--device", default="auto")
    b.add_argument("--compile", default=None, help="compile mode of the fast path (GPU default reduce-overhead; "
                   "on CPU adds a compiled row)")
    b.add_argument("--modes", help="modes to run, in order: GPU eager,fast (default),bf16,fast-nograph,"
                   "fast-nobench,graph,graph-nocl,fast-graph,fast-layout,fast-nocl,fast-graph-layout; CPU eager,cl "
                   "(default),compiled,compiled-layout")
    b.add_argument("--taeb", metavar="CONFIG", help="also bench the region tickets of this TA-EB config "
                   "(e.g. configs/cifar10_taeb.yaml) and name the slowest branch")
    b.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps per row: GPU kernel time, busy share, kernels/step, time by kernel "
                   "kind and the top kernels (CPU: top operators)")
    b.add_argument("--round", type=int, default=1, metavar="N",
                   help="round every ticket group's surviving channels to a multiple of N (early_bird.round_channels; "
                   "1 = the paper's sizes)")
    b.add_argument("--compile-cache", default="auto", metavar="DIR",
                   help="compile cache folder (train.compile_cache: auto = ~/.cache/ebdiff/compile, none = off); rows "
                   "record their step and compile seconds there for train.compile=auto")
    b.add_argument("--json", help="write the rows as JSON here")
    b.set_defaults(fn=cmd_bench)

    d = sub.add_parser("demo", help="EB-Diff-Train on Fashion-MNIST at demo scale (minutes on a CPU)")
    d.add_argument("--out", help="run folder (default runs/demo, runs/demo-latent with --latent, runs/demo-compare "
                   "with --compare; resumed if it exists)")
    d.add_argument("--compare", action="store_true", help="dense and Early-Bird trained for the same time each, "
                   "evaluated during training: quality-vs-time curves, both grids, which is better")
    d.add_argument("--seconds", type=float, help="--compare: training seconds per run (default 60)")
    d.add_argument("--latent", action="store_true", help="the class-conditional latent demo (configs/demo_latent.yaml: "
                   "a small VQ autoencoder, then ldm-tiny with classifier-free guidance, one grid row per class)")
    d.add_argument("overrides", nargs="*", help="section.key=value overrides of configs/demo.yaml")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`--out X train.iters=5`): argparse leaves those over
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except EbdiffError as exc:
        print(f"ebdiff: error: {exc}", file=sys.stderr)
        return getattr(exc, "code", 2)
    except OSError as exc:  # the machine's answer (no space left, read-only folder, ...): one line, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"ebdiff: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ebdiff: interrupted (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

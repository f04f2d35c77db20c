"""Command line: each command parses, calls one library function and prints a summary.

The parser is built from `COMMANDS` (one entry per subcommand: its function, help and arguments). Each
command imports its library module when it runs (import cost: the trainer, diffusers' pipelines, matplotlib
and torch-pruning load only for the command that needs them)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import choices
from .errors import ConfigError, EbdiffError
from .evaluate.report import count_text, format_train_summary, report_tables, write_report
from .runs.interop import SAMPLER_PREFIX, SCHEDULERS, register_diffusers_samplers


# ---------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .app.assemble import train
    from .runs.folders import train_run

    cfg, run_dir = train_run(args.resume, args.config, args.out, args.overrides)
    if args.resume and run_dir != Path(args.resume):
        print(f"resuming the newest run under {args.resume}: {run_dir}")
    _print_train_summary(train(cfg, run_dir, resume=bool(args.resume)))
    return 0


def _print_train_summary(s: dict) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(format_train_summary(s))


# ---------------------------------------------------------------------- sample, export, eval, report
def cmd_sample(args: argparse.Namespace) -> int:
    from .evaluate.evaluate import SAMPLE_OPTIONS, format_sample_info, sample_run
    from .training.distributed import resolve_device

    if args.scheduler:
        if args.sampler:
            raise ConfigError("--sampler (ebdiff's own) and --scheduler (diffusers') exclude each other: give one")
        args.sampler = SAMPLER_PREFIX + args.scheduler
    device = resolve_device(args.device)
    info = sample_run(Path(args.run), args.out, device, ema=not args.no_ema, route=args.route,
                      **{k: getattr(args, k) for k in SAMPLE_OPTIONS})
    print(format_sample_info(info, device))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .runs.folders import read_manifest
    from .runs.interop import export

    out = export(Path(args.run), Path(args.out), ema=not args.no_ema, formats=args.format)
    man = read_manifest(out)
    size = man["size"]
    print(f"exported {args.run} ({man['kind']}, {len(man['members'])} model{'s' * (len(man['members']) > 1)}, "
          f"{man['weights']} weights, {count_text(size['params'])} params, {count_text(size['macs'])} MACs) to {out}/")
    print(f"load it with ebdiff.load('{out}'); model card: {out / 'README.md'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate.evaluate import evaluate_run, one_line
    from .runs.checkpoint import RunLock
    from .runs.folders import require_checkpoints
    from .training.distributed import resolve_device

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
    md = write_report([Path(r) for r in args.runs], Path(args.out), args.reference and Path(args.reference),
                      args.target, args.interpolate)
    _print_tables(md)
    if args.target is not None and "## Time to quality" not in md.read_text():
        print(f"--target {args.target:g}: no run has evaluation points during training (train.eval_every), "
              "so there is no time to measure")
    print(f"report: {md}")
    return 0


def _print_tables(md: Path) -> None:
    print(report_tables(md.read_text()), end="")


# ---------------------------------------------------------------------- ta-eb, experiment
def cmd_taeb(args: argparse.Namespace) -> int:
    from .app.taeb import taeb_command
    from .training.taeb_spec import format_accounting

    run, a = taeb_command(args.resume, args.config, args.out, args.overrides, args.branch, args.combine)
    if a is None or args.branch is not None:  # a rank other than 0; one branch: its summary
        if a:
            print(f"{format_train_summary(a)}\nonce every branch is done: ebdiff ta-eb --combine {run}")
        return 0
    print("\n== ebdiff ta-eb summary ==")
    print(format_accounting(a))
    print(f"run folder {run}: regions.json, region-*/, taeb.json, hamming_regions.png; "
          f"sample with: ebdiff sample {run}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .app.experiment import format_plan, load_experiment, plan, run_experiment
    from .runs.checkpoint import RunLock

    for k in ("eval_n", "eval_steps"):
        if getattr(args, k) is not None and getattr(args, k) < (2 if k == "eval_n" else 1):
            raise ConfigError(f"--{k.replace('_', '-')} must be {'at least 2' if k == 'eval_n' else 'positive'}")
    exp = load_experiment(args.file, out=args.out, scale=args.scale, target=args.target,
                          interpolate=args.interpolate or None, extra=args.overrides, eval_n=args.eval_n,
                          eval_steps=args.eval_steps)
    only = [x for x in args.only.split(",") if x] if args.only else None
    print(format_plan(exp, plan(exp)))
    if args.dry_run:
        return 0
    with RunLock(exp.out, "experiment"):
        rec = run_experiment(exp, only=only, evaluate=not args.no_eval, device=args.device)
    print(f"\n== ebdiff experiment summary ({rec['seconds']:.0f} s) ==")
    if rec["report"]:
        _print_tables(Path(rec["report"]))
        print(f"report: {rec['report']}")
    print(f"record: {exp.out / 'experiment.json'}")
    return 0


# ---------------------------------------------------------------------- info, encode, bench, demo
def cmd_info(args: argparse.Namespace) -> int:
    from .app.info import format_sizes, size_rows

    rows = size_rows(args.preset, args.ratio, args.round)
    print(json.dumps(rows, indent=2) if args.json else format_sizes(rows))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode a latent preset's dataset once into its latent cache (what `train` would do first)."""
    from .backbones import ModelSpec
    from .config import load_config
    from .data.latents import describe_cache, latent_training_data
    from .training.distributed import resolve_device

    cfg = load_config(args.config, args.overrides)
    if not ModelSpec.of(cfg.model).latent:
        raise ConfigError(f"{ModelSpec.of(cfg.model).label} trains on pixels: encode is for latent models (ldm-*)")
    t0 = time.perf_counter()
    data = latent_training_data(cfg.data, cfg.model, resolve_device(args.device), progress=True)
    print(describe_cache(data, cfg.model.latent_scale, time.perf_counter() - t0))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .evaluate.bench import (bench_settings, device_label, format_profile, format_table, format_taeb, run_bench,
                                 taeb_rows)
    from .files import atomic_write_json
    from .training.compile_cache import CompileCache
    from .training.distributed import resolve_device

    device = torch.device(resolve_device(args.device))
    ratios, regions, modes = bench_settings(args.ratios, args.batch, args.steps, args.profile, args.round, device,
                                            args.compile, args.modes, args.taeb)
    name = device_label(device)
    print(f"ebdiff bench: {args.preset}, batch {args.batch}, {args.steps} timed steps after {args.warmup} "
          f"warm-up, on {name} (torch {torch.__version__})")

    def save(rows: list[dict], taeb=None, partial: bool = True) -> None:
        if args.json:
            atomic_write_json(Path(args.json), {"device": name, "torch": torch.__version__, "rows": rows, "taeb": taeb,
                                                "partial": partial, "command": " ".join(sys.argv)})

    rows = run_bench(args.preset, ratios, modes, args.batch, args.steps, args.warmup, device, profile=args.profile,
                     on_row=save, round_channels=args.round, cache=CompileCache.from_setting(args.compile_cache, device))
    print(format_table(rows))
    if args.profile:
        print("\nWhere the step time goes (torch.profiler, " + str(args.profile) + " steps per row):")
        for r in rows:
            print(format_profile(r))
    taeb = None if regions is None else taeb_rows(rows, regions)
    if taeb is not None:
        print("\nTA-EB region tickets (" + args.taeb + "):")
        print(format_taeb(taeb))
    if args.json:
        save(rows, taeb, partial=False)
        print(f"JSON: {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """EB-Diff-Train on Fashion-MNIST at demo scale: `demo.run_demo` (--latent too), `demo.run_demo_compare`."""
    from .app.demo import run_demo, run_demo_compare

    if args.compare:
        if args.latent or args.backbone != "unet":
            raise ConfigError("--compare is the UNet demo's comparison: without --latent or --backbone dit")
        r = run_demo_compare(args.out, args.seconds, args.overrides)
        _print_tables(r["report"])
        print(f"report: {r['report']} (quality_curves.png: quality vs training time; samples.png: both grids)")
        print(r["verdict"])
        return 0
    if args.seconds is not None:
        raise ConfigError("--seconds is the budget of `ebdiff demo --compare`; the plain demo trains train.iters")
    summary, info, out = run_demo(args.out, args.overrides, latent=args.latent, backbone=args.backbone)
    _print_train_summary(summary)
    print(f"{info['sampler']['n']} samples in {info['seconds']:.1f} s: {info['grid']}"
          + (" (one row per class)" if args.latent or args.backbone == "dit" else ""))
    print(f"\nDemo outputs in {out}/: samples_*.png (grid), hamming.png (mask distances), ticket.json, "
          "metrics.jsonl, checkpoints/")
    return 0


# ---------------------------------------------------------------------- the parser, as a table
def A(*flags: str, **kw) -> tuple[tuple[str, ...], dict]:
    """One argument: argparse's flags and keywords; `choices="section.key"` takes the config's choices."""
    return flags, kw


BOOL = {"action": "store_true"}
OVERRIDES = A("overrides", nargs="*", help="section.key=value, e.g. train.iters=200 model.preset=tiny")
DEVICE, SEED = A("--device", default="auto"), A("--seed", type=int)
NO_EMA = A("--no-ema", **BOOL, help="use the online weights instead of the EMA")
SPEED = [  # sample and eval: default the run's sample.* settings
    A("--precision", dest="mixed_precision", choices="sample.mixed_precision", help="bf16 autocast for the eps "
      "model (default: the run's sample.mixed_precision: auto = bf16 on a GPU)"),
    A("--compile", choices="sample.compile", help="torch.compile the eps model (default: the run's sample.compile: "
      "auto = reduce-overhead with CUDA graphs on a GPU for jobs of 2000+ model calls); compile time counts in "
      "images/s")]
TARGET = [  # report and experiment: time to quality
    A("--target", type=float, help="a quality value (e.g. 150 for FD-FMNIST; lower is better): each run's "
      "training time to reach it, from its evaluation points during training"),
    A("--interpolate", **BOOL, help="time to a target by linear interpolation between the two evaluation points "
      "around the crossing (default: the first point at or below it)")]
ROUND = A("--round", type=int, default=1, metavar="N", help="round every ticket group's surviving channels to a "
          "multiple of N (early_bird.round_channels; 1 = the paper's sizes)")

COMMANDS = {  # name: (function, help, arguments)
    "train": (cmd_train, "train a dense DDPM, or search + train an Early-Bird ticket (early_bird.ratio=R)", [
        A("--config", help="YAML config: a path, or a bundled config by name (demo, fmnist, cifar10, ...); "
          "defaults apply where absent"),
        A("--out", help="run folder (default runs/<timestamp>)"),
        A("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint (a parent or experiment "
          "folder: its most recently checkpointed run)"), OVERRIDES]),
    "sample": (cmd_sample, "DDIM/DDPM samples from a run: PNG grid + .npz of uint8 images", [
        A("run", help="run folder (newest checkpoint), checkpoint folder, TA-EB run or exported folder"),
        A("--n", type=int, help="number of images (default: the run's sample.n)"),
        A("--steps", type=int, help="DDIM steps (default 100)"),
        A("--sampler", choices="sample.sampler", help="ebdiff's ddim (the reference) or ddpm, or "
          "diffusers-<scheduler> (default: the run's)"),
        A("--scheduler", choices=list(SCHEDULERS), help="sample with this diffusers scheduler (the sampler "
          "diffusers-<NAME>), configured to the run's noise schedule; ddim and euler-ancestral visit --spacing "
          "uniform or trailing only"),
        A("--spacing", choices="sample.spacing"), A("--eta", type=float, help="DDIM eta (0 = deterministic)"), SEED,
        A("--clip-x0", dest="clip_x0", action=argparse.BooleanOptionalAction, default=None,
          help="DDIM: clip predicted x0 to [-1, 1] (default: the run's sample.clip_x0)"),
        A("--batch-size", type=int, dest="batch_size"), *SPEED, DEVICE, NO_EMA,
        A("--out", help="PNG path (default RUN/samples_<sampler><steps>.png)"),
        A("--route", choices="taeb.route", help="TA-EB runs: overlap routing rule"),
        A("--class", dest="classes", type=int, action="append", metavar="K", help="class-conditional runs: sample "
          "class K (repeatable; default: the run's sample.classes, else every class, one grid row each)"),
        A("--guidance", type=float, metavar="S", help="class-conditional runs: classifier-free guidance scale (1 = "
          "the conditional model; default: the run's sample.guidance)")]),
    "ta-eb": (cmd_taeb, "EB-Diff-Train (TA-EB): one ticket per timestep region, branches in parallel", [
        A("--config", help="YAML with a 'regions' list: a path, or a bundled config by name (demo_taeb, "
          "fmnist_taeb, cifar10_taeb)"),
        A("--out", help="run folder (default runs/taeb-<timestamp>)"),
        A("--resume", metavar="RUN_DIR", help="continue every unfinished branch (with --branch: that one)"),
        A("--branch", type=int, metavar="K", help="train region K's branch alone (its own job) into the run folder"),
        A("--combine", metavar="RUN_DIR", help="after every --branch job: regions.json, taeb.json"), OVERRIDES]),
    "export": (cmd_export, "a self-contained model folder (safetensors, pruning plan, config, model card) that "
               "ebdiff.load rebuilds without the run", [
        A("run", help="run folder, checkpoint folder or TA-EB run folder"),
        A("--out", required=True, help="new folder (must not exist, or be empty)"),
        A("--no-ema", **BOOL, help="export the online weights instead of the EMA"),
        A("--format", action="append", default=[], metavar="{onnx,torch-export}",
          help="also write each model as ONNX (model.onnx) or torch.export (model.pt2), to run without ebdiff; "
               "repeat for both (the folder is always written)")]),
    "eval": (cmd_eval, "sample a run and measure FD-<dataset>/FID, KID, params, MACs -> eval.json", [
        A("run"), A("--n", type=int, default=10_000, help="samples (the paper: 50000 with --metric fid)"),
        A("--metric", choices=["fd", "fid", "both"], default="fd", help="fd: FD on ebdiff's own dataset-classifier "
          "features (offline); fid: Inception (pytorch-fid)"),
        A("--steps", type=int, help="sampling steps (default: the run's sample.steps)"),
        A("--batch-size", type=int, dest="batch_size"), *SPEED, SEED, DEVICE,
        A("--inception-weights", help="local pt_inception-2015-12-05-6726825d.pth"),
        A("--data-root", help="dataset root (default: the run's data.root)"),
        A("--classifier-epochs", type=int, default=None, help="epochs of the feature classifier (default: its "
          "recipe: 3 for the grey CNN, 16 for ResNet-9; trained once, cached)")]),
    "experiment": (cmd_experiment, "run a comparison table (configs/experiments/*.yaml): train, skip, resume, "
                   "evaluate, report", [
        A("file", help="experiment YAML: a path, or a bundled experiment by name (cifar10_table4, "
          "fmnist_table4_cpu, ...)"),
        A("--out", help="output folder (default: the file's 'out')"),
        A("--scale", type=float, help="iteration scale factor (default: the file's 'scale')"),
        A("--only", help="comma-separated method names to run (their dense sources must be finished)"),
        A("--dry-run", **BOOL, help="print the plan and each method's status, train nothing"),
        A("--no-eval", **BOOL, help="skip the final evaluation (eval.json; the report's quality column then shows "
          "each run's last evaluation point during training, if any)"),
        A("--eval-n", type=int, help="samples of the final evaluation (default: the file's eval.n)"),
        A("--eval-steps", type=int, help="sampling steps of the final evaluation (default: the file's)"),
        A("--device", default="auto", help="device for evaluation"), *TARGET,
        A("overrides", nargs="*", help="section.key=value applied to every method after the file's (e.g. "
          "model.preset=tiny for a dry run)")]),
    "report": (cmd_report, "Markdown report with the paper-style table and figures", [
        A("runs", nargs="+", help="run folders (eval them first for the quality column)"),
        A("--out", default="report", help="output folder (report.md + PNGs)"),
        A("--reference", help="dense run whose training time defines speed-up 1.0x (default: the first dense run)"),
        *TARGET]),
    "info": (cmd_info, "parameters and MACs of presets (and of pruned tickets with --ratio)", [
        A("--preset", help="one preset (default: all)"),
        A("--ratio", type=float, action="append", help="pruning ratio to size (repeatable)"),
        ROUND, A("--json", **BOOL)]),
    "encode": (cmd_encode, "latent presets: encode the dataset once into the latent cache (train does it too, if "
               "missing)", [
        A("--config", help="YAML config of a latent preset (e.g. imagenet_ldm, demo_latent)"), DEVICE,
        A("overrides", nargs="*", help="section.key=value, e.g. model.autoencoder=PATH data.root=DIR")]),
    "bench": (cmd_bench, "training-step throughput: dense vs tickets, reference mode vs fast path", [
        A("--preset", default="cifar10"),
        A("--ratios", default="0,0.3,0.5", help="comma-separated pruning ratios; 0 = dense"),
        A("--batch", type=int, default=128), A("--steps", type=int, default=50, help="timed steps per row"),
        A("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)"), DEVICE,
        A("--compile", default=None, help="compile mode of the fast path (GPU default reduce-overhead; on CPU adds a "
          "compiled row)"),
        A("--modes", help="modes to run, in order: GPU eager,fast (default),bf16,fast-nograph,fast-nobench,graph,"
          "graph-nocl,fast-graph,fast-layout,fast-nocl,fast-graph-layout; CPU eager,cl (default),compiled,"
          "compiled-layout"),
        A("--taeb", metavar="CONFIG", help="also bench the region tickets of this TA-EB config (e.g. "
          "configs/cifar10_taeb.yaml) and name the slowest branch"),
        A("--profile", type=int, default=0, metavar="N", help="also profile N steps per row: GPU kernel time, busy "
          "share, kernels/step, time by kernel kind and the top kernels (CPU: top operators)"), ROUND,
        A("--compile-cache", default="auto", metavar="DIR", help="compile cache folder (train.compile_cache: auto = "
          "~/.cache/ebdiff/compile, none = off); rows record their step and compile seconds there for "
          "train.compile=auto"),
        A("--json", help="write the rows as JSON here")]),
    "demo": (cmd_demo, "EB-Diff-Train on Fashion-MNIST at demo scale (minutes on a CPU)", [
        A("--out", help="run folder (default runs/demo, runs/demo-latent with --latent, runs/demo-dit with "
          "--backbone dit, runs/demo-compare with --compare; resumed if it exists)"),
        A("--compare", **BOOL, help="dense and Early-Bird trained for the same time each, evaluated during "
          "training: quality-vs-time curves, both grids, which is better"),
        A("--seconds", type=float, help="--compare: training seconds per run (default 60)"),
        A("--latent", **BOOL, help="the class-conditional latent UNet demo (configs/demo_latent.yaml)"),
        A("--backbone", choices=["unet", "dit"], default="unet", help="dit: the DiT demo (configs/demo_dit.yaml)"),
        A("overrides", nargs="*", help="section.key=value overrides of configs/demo.yaml")]),
}


def build_parser() -> argparse.ArgumentParser:
    register_diffusers_samplers()  # diffusers-<name> samplers: valid --sampler values and config settings
    allowed = choices()
    p = argparse.ArgumentParser(prog="ebdiff", description="Early-Bird tickets for cheaper diffusion training")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (fn, help_, arguments) in COMMANDS.items():
        c = sub.add_parser(name, help=help_)
        for flags, kw in arguments:
            c.add_argument(*flags, **({**kw, "choices": allowed[kw["choices"]]} if isinstance(kw.get("choices"), str)
                                      else kw))
        c.set_defaults(fn=fn)
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
        print(f"ebdiff: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ebdiff: interrupted (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

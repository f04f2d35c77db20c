"""`ebdiff experiment FILE.yaml`: one comparison table (the paper's Table 4 and its ablations) in one command.

An experiment file names a base config, an iteration scale factor and a list of methods; each method
is an ordinary ebdiff run in `OUT/<name>/` (dense, Scratch / prune+finetune from an earlier dense
method, EB, TA-EB, each optionally with SpeeD or Min-SNR through its overrides). The runner trains
what is missing, resumes what was interrupted, skips what is finished, evaluates every run that
lacks a current `eval.json`, and writes the report (`OUT/report/report.md`) with speed-ups
against the reference method and, when the runs evaluate during training (`train.eval_every`), each
method's time to the reference's final quality and to `target`. Everything it did is recorded in
`OUT/experiment.json`.

    name: fmnist_table4
    base: ../demo.yaml            # relative to this file
    scale: 1.0                    # multiplies every budget: iteration counts, from: NAME@ITER, train.max_seconds,
                                  # eval cadence
    target: 150                   # optional: report each method's time to this quality (lower is better)
    out: runs/experiments/fmnist_table4
    overrides: [early_bird.ratio=null]   # applied to every method, before its own
    reference: dense              # the speed-up reference (default: the first method)
    eval: {metric: fd, n: 1000, steps: 50}   # or eval: null to skip evaluation
    methods:
      - {name: dense}
      - {name: pft-magnitude-50, from: dense, overrides: [prune.ratio=0.5, train.iters=200]}
      - {name: pft-at-400, from: dense@400, overrides: [prune.ratio=0.5]}   # its checkpoint at iteration 400
      - {name: eb-magnitude-50, overrides: [early_bird.ratio=0.5]}
      - {name: ta-eb, base: ../demo_taeb.yaml}
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, RunSpec, apply_overrides, find_config, load_config, read_yaml, validate
from ..core.accounting import summary_finished
from ..errors import ConfigError
from ..runs import checkpoint as ck
from ..training.taeb_spec import branch_config, branch_dir, region_set

TOP_KEYS = {"name", "base", "scale", "out", "overrides", "reference", "eval", "methods", "description", "target",
            "interpolate"}
METHOD_KEYS = {"name", "base", "overrides", "from", "description"}
EVAL_KEYS = {"metric", "n", "steps", "batch_size", "seed", "classifier_epochs"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Method:
    name: str
    base: Path
    overrides: list[str] = field(default_factory=list)
    source: str | None = None  # `from`: the dense method a prune/Scratch baseline starts from
    description: str = ""
    source_iteration: int | None = None  # `from: NAME@ITER`: its checkpoint at that iteration (None = the newest)


@dataclass
class Experiment:
    path: Path
    name: str
    base: Path
    scale: float
    out: Path
    overrides: list[str]
    reference: str
    eval: dict | None
    methods: list[Method]
    target: float | None = None  # a quality every method's time to reach is reported (time to quality)
    interpolate: bool = False  # time to a target by linear interpolation between evaluation points
    extra: list[str] = field(default_factory=list)  # overrides from the command line, applied last


def _source(value: Any, where: str) -> tuple[str | None, int | None]:
    """`from: NAME` (the dense method's newest checkpoint) or `from: NAME@ITER` (its checkpoint at ITER)."""
    if value is None:
        return None, None
    name, sep, at = str(value).partition("@")
    if sep and not (at.isdigit() and int(at) > 0):
        raise ConfigError(f"{where}: 'from: {value}' must be NAME or NAME@ITERATION (a positive iteration)")
    return name, int(at) if sep else None


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: 'overrides' must be a list of section.key=value strings")
    return list(value)


def load_experiment(path: str | Path, out: str | Path | None = None, scale: float | None = None,
                    target: float | None = None, interpolate: bool | None = None,
                    extra: list[str] | None = None, eval_n: int | None = None,
                    eval_steps: int | None = None) -> Experiment:
    """An experiment file; out, scale, target, interpolate, eval_n, eval_steps: the command line's (None =
    the file's); extra: overrides applied to every method after the file's."""
    path = find_config(path, "experiment")
    data = read_yaml(path, "experiment")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'base' and 'methods'")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(TOP_KEYS))})")
    here = path.parent

    def _file(p: Any, where: str) -> Path:
        if not isinstance(p, str):
            raise ConfigError(f"{where}: 'base' must be a config file path")
        f = (here / p) if not Path(p).is_absolute() else Path(p)
        if not f.is_file():
            raise ConfigError(f"{where}: base config {f} not found")
        return f

    base = _file(data.get("base"), str(path))
    scale = float(data.get("scale", 1.0) if scale is None else scale)
    if not scale > 0:
        raise ConfigError(f"{path}: 'scale' must be > 0; got {scale}")
    ev = data.get("eval", {"metric": "fd", "n": 1000})
    if ev is not None:
        if not isinstance(ev, dict) or set(ev) - EVAL_KEYS:
            raise ConfigError(f"{path}: 'eval' must be null or a mapping of {', '.join(sorted(EVAL_KEYS))}")
        ev = dict(ev, **{k: v for k, v in (("n", eval_n), ("steps", eval_steps)) if v is not None})
    methods, seen = [], set()
    raw = data.get("methods")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: 'methods' must be a non-empty list")
    for i, m in enumerate(raw):
        where = f"{path}: methods[{i}]"
        if not isinstance(m, dict) or "name" not in m:
            raise ConfigError(f"{where}: each method needs a 'name'")
        if set(m) - METHOD_KEYS:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(set(m) - METHOD_KEYS))} "
                              f"(known: {', '.join(sorted(METHOD_KEYS))})")
        name = str(m["name"])
        if not NAME_RE.match(name) or name in seen:
            raise ConfigError(f"{where}: name {name!r} must be unique and made of letters, digits, _ . + -")
        src, at = _source(m.get("from"), where)
        if src is not None and src not in seen:
            raise ConfigError(f"{where}: 'from: {src}' must name an earlier method")
        seen.add(name)
        methods.append(Method(name, _file(m["base"], where) if "base" in m else base,
                              _str_list(m.get("overrides"), where), src, str(m.get("description", "")), at))
    name = str(data.get("name", path.stem))
    reference = str(data.get("reference", methods[0].name))
    if reference not in seen:
        raise ConfigError(f"{path}: reference {reference!r} is not one of the methods")
    out_dir = Path(out or data.get("out") or f"runs/experiments/{name}")
    target = data.get("target") if target is None else target
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))):
        raise ConfigError(f"{path}: 'target' must be a number (a quality value, e.g. 150 for FD); got {target!r}")
    interp = data.get("interpolate", False) if interpolate is None else interpolate
    if not isinstance(interp, bool):
        raise ConfigError(f"{path}: 'interpolate' must be true or false; got {interp!r}")
    return Experiment(path, name, base, scale, out_dir, _str_list(data.get("overrides"), str(path)), reference,
                      ev, methods, None if target is None else float(target), interp, list(extra or []))


def _scaled(n: int, s: float) -> int:
    return max(1, int(round(n * s)))


def scale_config(cfg: Config, s: float) -> Config:
    """Every budget times s: iteration counts (at least 1: iterations, checkpoints, logs, checks, evaluation
    points, regions) and seconds (train.max_seconds, an evaluation cadence in seconds)."""
    if s == 1.0:
        return cfg
    from ..config import parse_every

    t, eb = cfg.train, cfg.early_bird
    t.iters, t.ckpt_every, t.log_every = _scaled(t.iters, s), _scaled(t.ckpt_every, s), _scaled(t.log_every, s)
    if t.max_seconds is not None:
        t.max_seconds = t.max_seconds * s
    every = parse_every(t.eval_every)
    if every is not None:
        t.eval_every = _scaled(int(every[1]), s) if every[0] == "iters" else f"{every[1] * s:g}s"
    if isinstance(eb.check_every, int):
        eb.check_every = _scaled(eb.check_every, s)
    if eb.max_search_iters is not None:
        eb.max_search_iters = _scaled(eb.max_search_iters, s)
    if cfg.regions:
        cfg.regions = [dict(r, iters=_scaled(r["iters"], s)) if r.get("iters") is not None else dict(r)
                       for r in cfg.regions]
    return cfg


def method_config(exp: Experiment, m: Method) -> Config:
    cfg = load_config(m.base)
    apply_overrides(cfg, exp.overrides + m.overrides + exp.extra)
    scale_config(cfg, exp.scale)
    if m.source is not None:
        src = exp.out / m.source
        cfg.prune.from_run = str(src if m.source_iteration is None
                                 else ck.ckpt_dir(src, _scaled(m.source_iteration, exp.scale)))
    return validate(cfg)


def is_taeb(cfg: Config) -> bool:
    return RunSpec.of(cfg).kind == "ta-eb"


def method_kind(cfg: Config) -> str:
    """The table's name for a run's kind (config.RunSpec)."""
    kind = RunSpec.of(cfg).kind
    if kind == "prune-from-run":
        return "scratch" if cfg.prune.reinit else "prune+finetune"
    return {"early-bird": "eb", "taeb-branch": "eb"}.get(kind, kind)


def run_status(run: Path, cfg: Config) -> str:
    """'done' (trained to its budget), 'resume' (a checkpoint exists) or 'new'."""
    if is_taeb(cfg):
        regions = region_set(cfg)
        states = []
        for k in range(len(regions)):
            d, bt = branch_dir(run, k), branch_config(cfg, regions[k]).train
            if summary_finished(ck.read_json(d / "summary.json"), bt.iters, bt.max_seconds):
                states.append("done")
            else:
                states.append("resume" if ck.latest_checkpoint(d) is not None else "new")
        if all(x == "done" for x in states):
            return "done" if (run / "taeb.json").is_file() else "resume"
        return "new" if all(x == "new" for x in states) else "resume"
    if summary_finished(ck.read_json(run / "summary.json"), cfg.train.iters, cfg.train.max_seconds):
        return "done"
    return "resume" if ck.latest_checkpoint(run) is not None else "new"


def _latest_name(run: Path, cfg: Config) -> Any:
    if is_taeb(cfg):
        return [getattr(ck.latest_checkpoint(branch_dir(run, k)), "name", None) for k in range(len(region_set(cfg)))]
    c = ck.latest_checkpoint(run)
    return c.name if c else None


def eval_is_current(run: Path, cfg: Config, ev: dict) -> bool:
    e = ck.read_json(run / "eval.json")
    if not e or e.get("n_samples") != ev.get("n", 1000):
        return False
    want = _latest_name(run, cfg)
    have = e.get("checkpoint")
    if is_taeb(cfg):  # the TA-EB eval records each branch's iteration
        its = [ck.read_meta(ck.latest_checkpoint(branch_dir(run, k)))["iteration"] if n else None
               for k, n in enumerate(want)]
        return have == its
    return have == want


def _train(cfg: Config, run: Path, status: str) -> None:
    if is_taeb(cfg):
        from .taeb import finalize, launch

        launch(cfg, run)
        finalize(run)
        return
    from .assemble import train

    run.mkdir(parents=True, exist_ok=True)
    train(cfg, run, resume=status == "resume")


def plan(exp: Experiment) -> list[dict]:
    rows = []
    for m in exp.methods:
        cfg = method_config(exp, m)
        run = exp.out / m.name
        kind = method_kind(cfg)
        iters = ([r.get("iters") or cfg.train.iters for r in cfg.regions] if is_taeb(cfg) else cfg.train.iters)
        rows.append({"name": m.name, "kind": kind, "run": str(run), "iters": iters,
                     "max_seconds": cfg.train.max_seconds, "eval_every": cfg.train.eval_every,
                     "status": run_status(run, cfg), "cfg": cfg})
    return rows


def run_experiment(exp: Experiment, only: list[str] | None = None, evaluate: bool = True, device: str = "auto",
                   progress: bool = True, log=print) -> dict:
    """Train / resume / skip each method, evaluate, report. Returns what experiment.json records."""
    from ..evaluate.evaluate import evaluate_run, one_line
    from ..evaluate.report import write_report
    from ..training.distributed import resolve_device

    if only:
        unknown = set(only) - {m.name for m in exp.methods}
        if unknown:
            raise ConfigError(f"--only: unknown method(s) {', '.join(sorted(unknown))}")
    exp.out.mkdir(parents=True, exist_ok=True)
    ck.atomic_write_text(exp.out / "experiment.yaml", exp.path.read_text())
    record = {"name": exp.name, "file": str(exp.path), "scale": exp.scale, "reference": exp.reference,
              "methods": []}
    rows = plan(exp)
    t_all = time.perf_counter()
    cfgs = {r["name"]: r.pop("cfg") for r in rows}
    for i, (m, row) in enumerate(zip(exp.methods, rows)):
        name, cfg, run = row["name"], cfgs[m.name], Path(row["run"])
        if only and name not in only:
            row["action"] = "not selected"
            record["methods"].append(row)
            continue
        status = run_status(run, cfg)  # again: an earlier method of this call may have changed it
        t0 = time.perf_counter()
        if status == "done":
            log(f"[{i + 1}/{len(rows)}] {name} ({row['kind']}): finished earlier, skipped")
            row["action"] = "skipped"
            if is_taeb(cfg) and cfg.train.eval_every is not None:  # a curve cut short after training
                from ..evaluate.training_eval import score_taeb_curve

                score_taeb_curve(run, resolve_device(cfg.train.device), progress=progress, log=log)
        else:
            if m.source is not None and run_status(exp.out / m.source, cfgs[m.source]) != "done":
                raise ConfigError(f"{name}: its dense run {exp.out / m.source} is not finished "
                                  "(run the experiment without --only, or that method first)")
            if m.source_iteration is not None and not (Path(cfg.prune.from_run) / "meta.json").is_file():
                raise ConfigError(f"{name}: 'from: {m.source}@{m.source_iteration}': no checkpoint "
                                  f"{cfg.prune.from_run} (the dense method's train.ckpt_every, train.keep_last)")
            log(f"[{i + 1}/{len(rows)}] {name} ({row['kind']}): {'resuming' if status == 'resume' else 'training'} "
                f"-> {run}")
            if status == "resume" and (run / "config.yaml").is_file() and not is_taeb(cfg):
                _warn_changed(run, cfg, log)
            _train(cfg, run, status)
            row["action"] = "resumed" if status == "resume" else "trained"
        row["train_call_s"] = time.perf_counter() - t0
        if evaluate and exp.eval is not None:
            if eval_is_current(run, cfg, exp.eval):
                row["eval"] = "current"
            else:
                ev = dict(exp.eval)
                r = evaluate_run(run, n=ev.get("n", 1000), metric=ev.get("metric", "fd"), steps=ev.get("steps"),
                                 batch_size=ev.get("batch_size"), seed=ev.get("seed"),
                                 classifier_epochs=ev.get("classifier_epochs"),
                                 device=resolve_device(device), progress=progress)
                log("    " + one_line(r))
                row["eval"] = "evaluated"
        record["methods"].append(row)
    runs = [exp.out / r["name"] for r in rows if (exp.out / r["name"] / "summary.json").is_file()
            or (exp.out / r["name"] / "taeb.json").is_file()]
    ref = exp.out / exp.reference
    md = (write_report(runs, exp.out / "report", ref if ref in runs else None, exp.target, exp.interpolate)
          if runs else None)
    record["report"] = str(md) if md else None
    record["time_to_quality"] = (ck.read_json(md.parent / "report.json") or {}).get("time_to_quality") if md else None
    record["seconds"] = time.perf_counter() - t_all
    ck.atomic_write_json(exp.out / "experiment.json", record)
    return record


def _warn_changed(run: Path, cfg: Config, log) -> None:
    old = yaml.safe_load((run / "config.yaml").read_text()) or {}
    new = copy.deepcopy(cfg.to_dict())
    old.get("train", {}).pop("iters", None)
    new["train"].pop("iters", None)
    if old != new:
        diff = sorted(f"{s}.{k}" for s in new if isinstance(new[s], dict) for k in new[s]
                      if (old.get(s) or {}).get(k) != new[s][k])
        log(f"    warning: {run} was started with different settings ({', '.join(diff[:6])}); resuming with the new ones")


def format_plan(exp: Experiment, rows: list[dict]) -> str:
    """The plan as `ebdiff experiment` prints it: one line per method (kind, budget, evaluation cadence, status)."""
    lines = [f"ebdiff experiment {exp.name}: {len(rows)} methods, scale {exp.scale}, out {exp.out}"]
    for r in rows:
        budget = f"iters {r['iters']!s}" + (f", <= {r['max_seconds']:g} s" if r["max_seconds"] else "")
        ev = f"eval every {r['eval_every']}" if r["eval_every"] is not None else ""
        lines.append(f"  {r['name']:<28} {r['kind']:<15} {budget:<30} {ev:<18} {r['status']}")
    return "\n".join(lines)

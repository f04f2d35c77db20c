"""Checkpoints without pickle: safetensors weights + JSON metadata + a weights-only training state.

Layout of a run folder:
    config.yaml                  resolved config
    metrics.jsonl                one JSON line per log interval / event
    checkpoints/ckpt-NNNNNNNNN/  model.safetensors, ema.safetensors, meta.json, state.pt
Every checkpoint folder is written under a temporary name and renamed into place, so a crash never
leaves a half-written checkpoint where a loader would pick it up. Only the last K are kept.

`TrainState` declares in one place everything that is training state (model, EMA, optimizer,
iteration, phase and pruning plan, timing, the Early-Bird search, the global RNG): what a checkpoint
writes and a resume restores (NVlabs/edm2's `CheckpointIO`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..core.accounting import Timing
from ..errors import CheckpointError

# run files are written and read through these; they are also this module's names (ck.atomic_save ...)
from ..files import atomic_save, atomic_write_json, atomic_write_text, json_default, json_line, read_json, usual_mode  # noqa: F401
from .confine import inside
from .facts import RunFacts

FORMAT = 1
METRICS_FILE = "metrics.jsonl"  # the run's log: one JSON record per line, each with the iteration it belongs to


def _state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def ckpt_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{iteration:09d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("ckpt-") and
                  (p / "meta.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def write_model_folder(final: Path, iteration: int, meta: dict[str, Any], weights: dict[str, nn.Module],
                       state: dict[str, Any] | None = None) -> Path:
    """A folder of safetensors weights (name -> module), meta.json and an optional weights-only state.pt,
    written under a temporary name and renamed into place (a checkpoint, or an evaluation snapshot)."""
    from safetensors.torch import save_file

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name.rstrip('0123456789')}*"):  # left by a killed write (one writer)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        os.chmod(tmp, usual_mode(folder=True))
        for name, module in weights.items():
            save_file(_state_dict_for_save(module), str(tmp / name))
        if state is not None:
            torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "iteration": iteration, **meta},
                                                  indent=2, default=json_default))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        kept = latest_checkpoint(final.parent.parent) if final.parent.name == "checkpoints" else None
        raise CheckpointError(f"cannot write checkpoint {final.name} in {final.parent} ({exc.strerror or exc}); "
                              f"{'the previous checkpoint ' + kept.name + ' is kept' if kept else 'no checkpoint was written'}"
                              ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_checkpoint(run_dir: Path, iteration: int, model: nn.Module, ema: nn.Module | None,
                    meta: dict[str, Any], state: dict[str, Any] | None, keep_last: int = 2) -> Path:
    """Write a checkpoint folder atomically, then drop all but the newest `keep_last`."""
    weights = {"model.safetensors": model, **({"ema.safetensors": ema} if ema is not None else {})}
    final = write_model_folder(ckpt_dir(run_dir, iteration), iteration, meta, weights, state)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def records_upto(lines: list[str], iteration: int) -> list[str]:
    """The log lines of a run that a resume from `iteration` keeps: records of later iterations are
    trained (and logged) again, so they go; lines without an iteration stay."""
    keep = []
    for line in lines:
        if not line.strip():
            continue
        try:
            it = json.loads(line).get("iter")
        except ValueError:
            continue  # a line cut by a crash
        if it is None or int(it) <= iteration:
            keep.append(line)
    return keep


def truncate_log(path: Path, iteration: int) -> None:
    """Drop the records of `path` (a metrics.jsonl) past `iteration`, atomically (a resume's first step)."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = records_upto(lines, iteration)
    if keep != lines:
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def read_records(path: Path) -> list[dict]:
    """The JSON records of a metrics.jsonl (none if it is missing); a line cut by a crash is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            if line.strip():
                out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} has no readable meta.json ({exc.__class__.__name__})") from None
    if meta.get("format") != FORMAT or "preset" not in meta:
        raise CheckpointError(f"checkpoint {ckpt} is not an ebdiff checkpoint (format {meta.get('format')!r})")
    return meta


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """The architecture a checkpoint describes (`backbones.ModelSpec.record`: its preset, or the diffusers settings
    that replace the preset's), with its pruning plan replayed."""
    from ..backbones import ModelSpec
    from ..pruning.engine import apply_plan, check_plan

    plan = check_plan(meta.get("plan") or [])  # before any model is built
    model = ModelSpec.from_meta(meta).build()
    if plan:
        apply_plan(model, plan)
    return model


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load a safetensors file into `model`; a missing, unexpected, wrong-shape or non-finite tensor stops
    with one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read weights {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    misfit = state_misfit(model.state_dict(), sd, "in the file", "missing from the file")
    if misfit is not None:
        what, n = misfit
        raise CheckpointError(f"weights {path} do not fit the architecture in meta.json: {what}"
                              + (f" (and {n - 1} more)" if n > 1 else ""))
    bad = first_nonfinite(sd.items())
    if bad is not None:
        raise CheckpointError(f"weights {path} hold non-finite values (tensor '{bad}'): this checkpoint is unusable")
    model.load_state_dict(sd, strict=True)
    return model


def state_misfit(want: dict, sd: dict, shape_at: str, missing_at: str) -> tuple[str, int] | None:
    """Whether state dict `sd` fits a model's `want` tensor by tensor: None, or (the first offender in words, how
    many offend). shape_at / missing_at: how the words name where `sd` came from ("in the file", "missing from
    the file")."""
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if not (missing or unexpected or wrong):
        return None
    k = (wrong or missing or unexpected)[0]
    what = (f"tensor '{k}' has shape {list(sd[k].shape)} {shape_at} but {list(want[k].shape)} in the model" if wrong
            else f"tensor '{k}' is {missing_at if missing else 'not in the model'}")
    return what, len(missing) + len(unexpected) + len(wrong)


def load_model(ckpt: Path, ema: bool = True, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint folder (EMA weights by default). No pickle involved."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    name = "ema.safetensors" if ema and (ckpt / "ema.safetensors").is_file() else "model.safetensors"
    model = load_weights(build_from_meta(meta), ckpt / name)
    return model.to(device).eval(), meta


def load_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file, or one that needs unpickling code
        raise CheckpointError(f"cannot read training state {path}: {type(exc).__name__}") from None
    if not isinstance(state, dict) or not {"iteration", "optimizer", "rng"} <= set(state):
        raise CheckpointError(f"training state {path} lacks iteration/optimizer/rng: not an ebdiff state")
    return state


def first_nonfinite(named_tensors) -> str | None:
    """The name of the first floating-point tensor of (name, tensor) pairs that holds a non-finite value."""
    return next((k for k, v in named_tensors if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def nonfinite_tensor(*modules: nn.Module) -> str | None:
    """The name of the first parameter or buffer of `modules` that holds a non-finite value, or None."""
    return first_nonfinite(kv for m in modules for kv in m.state_dict().items())


class RunLock:
    """One writer per run folder: an exclusive lock (flock) on RUN/.ebdiff.lock, held while a command
    writes the folder. The kernel drops the lock when its process ends, however it ends, so a crashed or
    killed run never leaves the folder locked: a stale lock file is simply taken over."""

    NAME = ".ebdiff.lock"

    def __init__(self, folder: Path, command: str):
        self.folder, self.command, self.fd = Path(folder), command, None

    def __enter__(self) -> "RunLock":
        import fcntl
        import socket
        import time as _time

        from ..errors import LockError

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = read_json(path) or {}
            raise LockError(f"{self.folder} is in use by another ebdiff process ({h.get('command', '?')}, pid "
                            f"{h.get('pid', '?')} on {h.get('host', '?')}, since {h.get('since', '?')}): wait for "
                            "it to finish or stop it, then retry") from None
        except OSError:  # a file system without flock (some network mounts): go on unlocked
            pass
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"command": self.command, "pid": os.getpid(), "host": socket.gethostname(),
                                 "since": _time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def read_resumable(ckpt: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model with its online weights, meta, training state) of one checkpoint, every file a resume reads
    checked (the EMA weights too, which `TrainState.restore` loads later), or CheckpointError."""
    meta = read_meta(ckpt)
    try:
        model = load_weights(build_from_meta(meta), ckpt / "model.safetensors")
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: its meta.json does not rebuild a model ({type(exc).__name__})"
                              ) from None
    load_weights(copy.deepcopy(model), ckpt / "ema.safetensors")
    return model, meta, load_state(ckpt)


def read_for_resume(run_dir: Path, log=print) -> tuple[Path, nn.Module, dict[str, Any], dict[str, Any]]:
    """(checkpoint folder, model with its online weights, meta, training state) of a run's newest checkpoint
    that reads; each newer one that does not is skipped with one line through `log` saying why (it is left
    in place). CheckpointError when none reads."""
    cks = list_checkpoints(run_dir)
    if not cks:
        raise CheckpointError(f"--resume: {run_dir} has no checkpoint to resume from")
    first = None
    for ckpt in reversed(cks):
        try:
            return (ckpt, *read_resumable(ckpt))
        except CheckpointError as exc:
            first = first or exc
            log(f"--resume: skipping checkpoint {ckpt.name}, which does not read ({exc}); it is left in place")
    raise CheckpointError(f"--resume: none of the {len(cks)} checkpoints of {run_dir} reads (the newest: {first})")


def newest_run(path: Path, depth: int = 2) -> Path | None:
    """`path` itself when it is a run folder (config.yaml), else the run folder below it (at most `depth`
    levels: an experiment's or a parent folder's runs) whose newest checkpoint is the most recent. TA-EB
    branch folders (region-k of a run with regions.json) are not runs of their own here."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return path
    best, best_t = None, -1.0
    level = [path]
    for _ in range(depth):
        level = [c for d in level if d.is_dir() for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")]
        for d in level:
            if (d / "config.yaml").is_file() and not (d.parent / "regions.json").is_file():
                ck = latest_checkpoint(d)
                t = ck.stat().st_mtime if ck else -1.0
                if ck and t > best_t:
                    best, best_t = d, t
    return best


def run_folder(path: Path) -> Path:
    """The run folder of a run or checkpoint folder (where config.yaml, summary.json, eval.json live): a
    checkpoint folder (it holds meta.json) is RUN/checkpoints/ckpt-N."""
    path = Path(path)
    return path.parent.parent if (path / "meta.json").is_file() else path


def resolve_checkpoint(path: Path) -> Path:
    """A run folder (-> its newest checkpoint) or a checkpoint folder."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint: {path}")
    ck = latest_checkpoint(path)
    if ck is None:
        raise CheckpointError(f"{path} holds no checkpoint (expected {path}/checkpoints/ckpt-*/meta.json)")
    return inside(path, ck.relative_to(path), "checkpoint")


# ---------------------------------------------------------------------- training state
def rng_state() -> dict[str, Any]:
    """The global RNGs (dropout draws from torch's), as tensors: weights-only loadable."""
    s = np.random.get_state()
    np_state = json.dumps([s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]).encode()
    st = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.frombuffer(np_state, dtype=np.uint8).copy())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "numpy" in st:
        s = json.loads(bytes(st["numpy"].numpy()).decode())
        np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


@dataclass
class TrainState:
    """Everything a resume needs, declared once. `model` and `ema` weights go to safetensors, the plan
    and the run facts (`facts.RunFacts`: ticket, dense size, pruned_from, image shape) to meta.json, the
    rest to the weights-only state.pt."""

    model: nn.Module
    ema: Any  # step.EMA
    optimizer: torch.optim.Optimizer
    iteration: int = 0
    phase: str = "dense"  # dense | ticket (Early-Bird extracted) | pruned (dense-then-prune baseline)
    plan: list | None = None
    timing: Timing = field(default_factory=Timing)
    search: Any = None  # search.EarlyBirdSearch while searching, else None
    facts: RunFacts = field(default_factory=RunFacts)

    @property
    def train_s(self) -> float:
        """Training seconds so far, as the speed-up counts them: own training plus what the run depends on
        (the dense run a prune-from-run baseline was cut from)."""
        return self.timing.own_total + self.facts.dependency_s

    def save(self, run_dir: Path, keep_last: int, arch: dict) -> Path:
        """arch: what rebuilds the dense architecture (preset, dropout)."""
        meta = {**arch, "phase": self.phase, "plan": self.plan, **self.facts.to_meta()}
        state = {"iteration": self.iteration, "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                 "timing": self.timing.to_dict(), "ema_updates": self.ema.updates, "ema_steps": self.ema.steps}
        if self.search is not None:
            state["search"] = self.search.state_dict()
        return save_checkpoint(run_dir, self.iteration, self.model, self.ema.module, meta, state, keep_last)

    def restore(self, ckpt: Path, saved: dict) -> None:
        """Load a checkpoint's EMA, optimizer, timing, search and RNG into this state, whose model
        (rebuilt from the same checkpoint), EMA and optimizer are already built."""
        load_weights(self.ema.module, Path(ckpt) / "ema.safetensors")
        self.ema.updates = int(saved.get("ema_updates", 0))
        self.ema.steps = int(saved.get("ema_steps", self.ema.updates))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.iteration = int(saved["iteration"])
        self.timing = Timing.from_dict(saved.get("timing", {}))
        if self.search is not None and saved.get("search") is not None:
            try:
                self.search.load_state_dict(saved["search"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"the Early-Bird search state in {ckpt}/state.pt is unreadable "
                                      f"({type(exc).__name__}): resume from an older checkpoint") from None
        set_rng_state(saved["rng"])

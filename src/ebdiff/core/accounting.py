"""Training-time accounting: where a run's seconds went, the loss of a log interval, and the run summary.

The paper's speed-up compares training wall-clock times: EB counts its dense search (training and
checks), the extraction and the ticket's training; a dense-then-prune baseline also counts the dense
run it was cut from; TA-EB counts its longest branch (`taeb.accounting`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields


@dataclass
class Timing:
    dense_s: float = 0.0  # training steps of the dense model (the whole run when no ticket is drawn)
    sparse_s: float = 0.0  # training steps of the ticket / pruned model
    check_s: float = 0.0  # Early-Bird checks (mask computation)
    extract_s: float = 0.0  # extraction / pruning, rebuilding optimizer, EMA and step
    search_s: float = 0.0  # dense_s when the ticket was drawn
    wall_s: float = 0.0  # wall clock of the training calls (resumes added up), evaluation during training excluded
    eval_s: float = 0.0  # evaluation during training (train.eval_every): never counted as training

    def add_step(self, phase: str, seconds: float) -> None:
        if phase == "dense":
            self.dense_s += seconds
        else:
            self.sparse_s += seconds

    @property
    def own_total(self) -> float:
        return self.dense_s + self.sparse_s + self.check_s + self.extract_s

    def to_dict(self) -> dict:
        return asdict(self)

    def budget_reached(self, iteration: int, iters: int, max_seconds: float | None) -> str | None:
        """Why a run is finished: "iters" (train.iters done), "max_seconds" (its own training time reached
        train.max_seconds, after at least one iteration: a prune-from-run baseline whose pruning alone
        took longer still trains one), or None (not finished)."""
        if iteration >= iters:
            return "iters"
        if max_seconds is not None and iteration > 0 and self.own_total >= max_seconds:
            return "max_seconds"
        return None

    @classmethod
    def from_dict(cls, d: dict) -> "Timing":
        known = {f.name for f in fields(cls)}
        return cls(**{k: float(v) for k, v in d.items() if k in known})


class LossMeter:
    """The training loss of one log interval: summed on the device (no host read per step), the steps that
    train.nonfinite=skip dropped counted, and the interval's images/s (time paused for evaluation excluded)."""

    def __init__(self, device, iteration: int):
        import torch

        self.sum, self.n, self.skipped = torch.zeros((), device=device), 0, 0
        self.it0, self.t0 = iteration, time.perf_counter()

    def add(self, loss) -> None:
        if loss is None:
            self.skipped += 1
        else:
            self.sum += loss
            self.n += 1

    def pause(self, seconds: float) -> None:
        self.t0 += seconds

    def interval(self, iteration: int, batch_size: int, mean) -> dict:
        """{loss (absent when every step was skipped), images_per_s, skipped_steps (when any)} of the interval
        up to `iteration`, and a new interval begins. mean: averages the summed loss over the processes."""
        loss = float(mean(self.sum)) / max(self.n, 1)
        rec = {"loss": loss, "images_per_s": (iteration - self.it0) * batch_size / max(time.perf_counter() - self.t0, 1e-9)}
        if self.skipped:
            rec["skipped_steps"] = self.skipped
            if not self.n:
                del rec["loss"]
        self.sum.zero_()
        self.n, self.skipped, self.it0, self.t0 = 0, 0, iteration, time.perf_counter()
        return rec


def run_summary(*, run_dir: str, iteration: int, phase: str, timing: Timing, dense_size: dict | None,
                size: dict | None, ticket: dict | None, pruned_from: dict | None, device: str, processes: int,
                fast_path: dict, skipped_steps: int = 0, compile_decisions: list | None = None,
                stopped: str | None = None) -> dict:
    """summary.json of a run. size: the trained model's params/MACs when it is not the dense one.
    skipped_steps: steps dropped for a non-finite loss or gradient (train.nonfinite=skip).
    compile_decisions: train.compile=auto's choice per model shape (none when it did not decide).
    stopped: which budget ended it ("iters" or "max_seconds"; None while unfinished)."""
    search_iters = ticket["iteration"] if ticket and phase == "ticket" else None
    if pruned_from is not None:  # dense-then-prune: the dense run it started from is part of its cost
        dense_its, sparse_its = pruned_from["iteration"], iteration
        depends = pruned_from.get("train_s") or 0.0
    else:
        dense_its = search_iters if search_iters is not None else iteration
        sparse_its, depends = iteration - dense_its, 0.0
    own = timing.own_total
    return {
        "run_dir": run_dir,
        "iterations": iteration,
        "stopped": stopped,
        "phase": phase,
        "dense_iterations": dense_its,
        "ticket_iterations": sparse_its,
        "dense": dense_size,
        "ticket": size,
        "ticket_info": ticket,
        "pruned_from": pruned_from,
        "time_s": {**timing.to_dict(), "own_total": own, "dependency_s": depends, "train_total": own + depends},
        "device": device, "processes": processes, "fast_path": fast_path, "skipped_steps": skipped_steps,
        "compile_decisions": compile_decisions,
    }


def summary_finished(summary: dict | None, iters: int, max_seconds: float | None) -> bool:
    """Whether a run whose summary.json is `summary` has reached one of its budgets (train.iters or
    train.max_seconds): `ebdiff experiment` skips it then."""
    if not summary:
        return False
    timing = Timing.from_dict(summary.get("time_s") or {})
    return timing.budget_reached(int(summary.get("iterations", 0)), iters, max_seconds) is not None

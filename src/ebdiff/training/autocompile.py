"""`train.compile=auto`: compile the training step only when the planned iterations repay the warm-up.

Pure logic (no torch, no files): the training step (`step.TrainStep`) gathers the timings and prints
the decision; `decide_compile` is the rule, tested with given timings.

    compile  iff  planned_iters x (uncompiled step s - compiled step s)  >  margin x compile s

- planned_iters: the iterations this model shape will train: train.iters - the current iteration (for
  the dense phase of an Early-Bird run an upper bound, since the ticket may come earlier; for a ticket
  exactly what is left).
- uncompiled step: measured in the run itself (its first steps run uncompiled, `EAGER_SETTLE` steps
  to settle and `EAGER_WINDOW` timed), or a step time recorded for this shape by an earlier run or
  `ebdiff bench` in the compile cache (`compile_cache.CompileCache.timings`).
- compiled step: recorded for this shape, else on a GPU `EXPECTED_COMPILED_RATIO` x the uncompiled step.
- compile s: recorded for this shape (a cache hit's or a miss's measured first-step overhead), else on
  a GPU `DEFAULT_HIT_S` when the cache holds the shape and `DEFAULT_MISS_S` when not.
Where a number is missing (the CPU without records; the whole-step CUDA graph without records of both
its uncompiled and compiled step), the decision cannot be made and today's behaviour stays: compile on
a GPU, not on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# First compilation of a new model shape, measured on an H200 (torch 2.11, cifar10 preset, dense and
# 50% ticket, `fast` and `fast-graph` modes): 72-93 s. Used on a GPU when nothing was recorded.
DEFAULT_MISS_S = 90.0
# A shape already in the compile cache: dynamo still traces, inductor loads its entries. Issue 14's
# target (<= 15 s); on this project's CPU a kept inductor folder gave 7-11 s for the tiny preset.
# Replaced by the measured hit time once a run has recorded one.
DEFAULT_HIT_S = 15.0
# Compiled / uncompiled step time with the same fast path (bf16, channels_last, fused Adam), H200,
# cifar10 batch 128: dense 14.1 -> 36.2 it/s (0.39), 50% ticket 15.5 -> 65.5 it/s (0.24). The dense
# ratio, the smaller saving, is the estimate for a shape with no record.
EXPECTED_COMPILED_RATIO = 0.39
EAGER_SETTLE, EAGER_WINDOW = 2, 3  # uncompiled steps: untimed (cuDNN autotuning), then timed


@dataclass(frozen=True)
class CompileDecision:
    compile: bool
    planned_iters: int
    uncompiled_step_s: float
    compiled_step_s: float
    compile_s: float
    saving_s: float  # planned_iters x (uncompiled - compiled)
    break_even_iters: float  # iterations after which compiling has paid for itself (inf: never)
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def decide_compile(planned_iters: int, uncompiled_step_s: float, compiled_step_s: float, compile_s: float,
                   margin: float = 1.0, sources: str = "") -> CompileDecision:
    """The rule above, on given timings (seconds). A compiled step that is not faster never compiles.

    >>> decide_compile(2000, 0.10, 0.06, 90.0).compile    # saves 80 s < 90 s
    False
    >>> decide_compile(2000, 0.10, 0.06, 8.0).compile     # a cache hit: 80 s > 8 s
    True
    """
    if planned_iters < 0 or uncompiled_step_s < 0 or compiled_step_s < 0 or compile_s < 0 or margin <= 0:
        raise ValueError("iterations and times must be >= 0 and margin > 0")
    gain = uncompiled_step_s - compiled_step_s
    saving = planned_iters * gain
    be = compile_s / gain if gain > 0 else math.inf
    tail = f" ({sources})" if sources else ""
    if gain <= 0:
        return CompileDecision(False, planned_iters, uncompiled_step_s, compiled_step_s, compile_s, saving, be,
                               f"the compiled step ({compiled_step_s * 1e3:.1f} ms) is not faster than the "
                               f"uncompiled one ({uncompiled_step_s * 1e3:.1f} ms){tail}")
    ok = saving > margin * compile_s
    rel = ">" if ok else "<="
    return CompileDecision(ok, planned_iters, uncompiled_step_s, compiled_step_s, compile_s, saving, be,
                           f"{planned_iters} iterations x {gain * 1e3:.1f} ms saved per step = {saving:.0f} s {rel} "
                           f"{'' if margin == 1 else f'{margin:g} x '}{compile_s:.0f} s of compilation; break-even "
                           f"at {be:.0f} iterations{tail}")


def estimate(uncompiled_step_s: float | None, compiled_record: dict, gpu: bool, cached: bool,
             graph: bool = False) -> tuple[float | None, float | None, str]:
    """(compiled step s, compile s, where they come from) for a shape, from its compiled mode's timing
    record ({} when none) and the defaults above; None where neither gives a number (the CPU, or the
    whole-step graph, without a record). `cached`: the compile cache holds this shape."""
    srcs = []
    step = compiled_record.get("step_s")
    if step is not None:
        srcs.append("compiled step recorded")
    elif gpu and not graph and uncompiled_step_s is not None:
        step = EXPECTED_COMPILED_RATIO * uncompiled_step_s
        srcs.append(f"compiled step expected {EXPECTED_COMPILED_RATIO:g}x (H200)")
    comp = compiled_record.get("compile_hit_s" if cached else "compile_miss_s")
    if comp is not None:
        srcs.append(f"compile {'hit' if cached else 'miss'} recorded")
    elif gpu:
        comp = DEFAULT_HIT_S if cached else DEFAULT_MISS_S
        srcs.append(f"compile {'hit' if cached else 'miss'} expected")
    return step, comp, ", ".join(srcs)

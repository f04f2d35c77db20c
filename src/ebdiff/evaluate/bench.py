"""Training-step throughput: dense vs pruned tickets, reference mode vs the fast path.

Each row builds the model (a dense preset, or its ticket at a ratio: magnitude plan on the initial
weights), its optimizer and EMA, and runs the trainer's own `TrainStep` on random data resident on
the device. Warm-up (and compilation) is timed apart from the measured steps.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import replace

import torch

from ..backbones import backbone_of, build_model, count_macs_params
from ..core.diffusion import DiffusionLoss, Schedule
from ..core.mfu import format_flops
from ..training.step import EAGER_FP32, EMA, FastPath, TrainStep, make_optimizer, prepare_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_ticket(preset: str, ratio: float, device: torch.device, round_channels: int = 1) -> torch.nn.Module:
    """The dense preset (ratio 0) or its magnitude ticket on the seed-0 initial weights, its surviving
    channels rounded to multiples of `round_channels` (`early_bird.round_channels`)."""
    from ..pruning.engine import prune

    torch.manual_seed(0)
    dense = build_model(preset)
    if ratio <= 0:
        return dense.to(device)
    return prune(dense, "magnitude", ratio, multiple=round_channels).model.to(device)


KERNEL_KINDS = (  # (kind, substrings of a GPU kernel's lower-cased name), first match wins
    ("triton (fused by inductor)", ("triton_",)),
    ("attention", ("flash", "fmha", "attention")),
    ("optimizer / EMA", ("adam", "multi_tensor", "foreach", "lerp")),
    ("conv (cuDNN)", ("fprop", "dgrad", "wgrad", "conv", "implicit", "winograd", "cudnn")),
    ("gemm", ("gemm", "cutlass", "cublas", "xmma")),
    ("copy / layout", ("copy", "memcpy", "memset", "transpose", "nchw", "nhwc")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_steps(run_step, steps: int, device: torch.device, ms_step: float, top: int = 12) -> dict:
    """Where a step's time goes (torch.profiler over `steps` steps, after warm-up).

    GPU: kernel time per step and its share of the measured step time (`busy`; well under 100% means
    the GPU waits for the host: launch-bound), kernels launched per step, time by kernel kind, and the
    top kernels. CPU: the top operators by self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    if not cuda:  # kineto's "no GPU found" error line is noise on the CPU; on a GPU its errors matter
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            run_step()
        _sync(device)
    events = [e for e in prof.key_averages()
              if (e.device_type == DeviceType.CUDA) == cuda and e.device_type in (DeviceType.CUDA, DeviceType.CPU)]
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total_us = sum(getattr(e, attr) for e in events)
    ranked = sorted(events, key=lambda e: -getattr(e, attr))
    out = {"steps": steps, "timer": "gpu kernels" if cuda else "cpu operators (self time)",
           "ms_per_step": total_us / 1e3 / steps,
           "top": [{"name": e.key[:120], "calls_per_step": e.count / steps,
                    "ms_per_step": getattr(e, attr) / 1e3 / steps,
                    "share": getattr(e, attr) / total_us if total_us else 0.0} for e in ranked[:top]]}
    if cuda:
        kinds: dict[str, float] = {}
        for e in events:
            k = kernel_kind(e.key)
            kinds[k] = kinds.get(k, 0.0) + e.self_device_time_total
        out["kernels_per_step"] = sum(e.count for e in events) / steps
        out["busy"] = out["ms_per_step"] / ms_step if ms_step else None
        out["by_kind"] = {k: {"ms_per_step": v / 1e3 / steps, "share": v / total_us if total_us else 0.0}
                          for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
    out["copies"] = copy_sources(prof.events(), steps, cuda)
    return out


COPY_OPS = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::contiguous", "aten::clone", "aten::reshape",
            "aten::_reshape_alias", "aten::copy", "aten::empty_like", "aten::empty_strided")


def copy_sources(events, steps: int, cuda: bool, top: int = 8) -> list[dict]:
    """Who makes the step's copies: every copy (GPU: a kernel of kind "copy / layout"; CPU: an `aten::copy_`)
    attributed to the chain of operators that launched it, up to the first one that is not itself a
    copy/layout operator (e.g. `aten::copy_ < aten::contiguous < aten::cudnn_convolution_backward`).
    Calls and milliseconds per step, largest first."""
    found: dict[str, list[float]] = {}
    for e in events:
        if cuda:
            ks = [k for k in getattr(e, "kernels", []) if kernel_kind(k.name) == "copy / layout"]
            if not ks:
                continue
            n, us = len(ks), sum(k.duration for k in ks)
        else:
            if e.name != "aten::copy_":
                continue
            n, us = 1, e.self_cpu_time_total
        chain, p = [e.name], e.cpu_parent
        while p is not None and chain[-1] in COPY_OPS:
            chain.append(p.name)
            p = p.cpu_parent
        acc = found.setdefault(" < ".join(chain), [0, 0.0])
        acc[0] += n
        acc[1] += us
    ranked = sorted(found.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"source": k, "calls_per_step": v[0] / steps, "ms_per_step": v[1] / 1e3 / steps} for k, v in ranked]


def format_profile(row: dict) -> str:
    p = row["profile"]
    head = f"{row['mode']}, ratio {row['ratio']:.2f}: {row['ms_step']:.2f} ms/step measured " \
           f"({format_flops((row.get('model_tflops_s') or 0) * 1e12)}, MFU {format_mfu(row.get('mfu'), row.get('mfu_precision'))}); " \
           f"{p['timer']} {p['ms_per_step']:.2f} ms/step"
    if p.get("busy") is not None:
        head += f" (GPU busy {100 * p['busy']:.0f}%, {p['kernels_per_step']:.0f} kernels/step)"
        head += "\n  by kind: " + ", ".join(f"{k} {100 * v['share']:.0f}%" for k, v in p["by_kind"].items())
    lines = [head] + [f"  {100 * e['share']:5.1f}%  {e['ms_per_step']:7.3f} ms  x{e['calls_per_step']:<5.0f} {e['name'][:90]}"
                      for e in p["top"]]
    if p.get("copies"):
        lines.append("  copies by source (launching operators):")
        lines += [f"          {c['ms_per_step']:7.3f} ms  x{c['calls_per_step']:<5.0f} {c['source'][:150]}" for c in p["copies"]]
    return "\n".join(lines)


def device_label(device: torch.device) -> str:
    """The GPU's name (what `mfu.gpu_family` reads), or the CPU's."""
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def bench_one(preset: str, ratio: float, fast: FastPath, batch: int, steps: int, warmup: int,
              device: torch.device, tcfg=None, profile: int = 0, round_channels: int = 1, cache=None) -> dict:
    """profile: also profile this many steps after the timed ones (`profile_steps`). round_channels:
    the ticket's surviving channels rounded to multiples of it (`early_bird.round_channels`). cache: the
    compile cache (`compile_cache.CompileCache`): compiled rows load and save it, and every row records
    its measured step (and compile) seconds there, which `train.compile=auto` reads."""
    from ..config import TrainConfig
    from ..core.mfu import compute_mfu, step_precision

    tcfg = tcfg or TrainConfig()
    model = make_ticket(preset, ratio, device, round_channels).train()
    macs, params = count_macs_params(model)
    prepare_model(model, fast)
    opt = make_optimizer(model.parameters(), tcfg, fast)
    ema = EMA.from_config(model, tcfg)
    objective = DiffusionLoss(Schedule.linear(), device=device)
    step = TrainStep(model, model, opt, ema, objective, tcfg.grad_clip, fast, cache=cache, measure=False)
    shape = backbone_of(model).sample_shape(model)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, *shape, device=device, generator=g) * 2 - 1
    noise = torch.randn(batch, *shape, device=device, generator=g)
    t = objective.timesteps(batch, torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step(x0, t, noise)
    _sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(x0, t, noise)
    _sync(device)
    dt = time.perf_counter() - t0
    compile_s = max(0.0, warm_s - warmup * dt / steps) if fast.compile != "none" else None
    step.record_timing(x0, dt / steps, compile_s)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    row = {"preset": preset, "ratio": ratio, "mode": fast.describe(), "fast_path": fast.to_dict(),
           "batch": batch, "params": params, "macs": macs, "it_s": steps / dt, "images_s": steps * batch / dt,
           "ms_step": dt / steps * 1e3, "warmup_s": warm_s, "warmup_steps": warmup, "steps": steps,
           "peak_mem_bytes": peak, "final_loss": float(loss), "device": str(device), "round_channels": round_channels,
           "compile_s": compile_s, "compile_cache_hit": step.cache_hit if fast.compile != "none" else None}
    m = compute_mfu(macs, batch, dt / steps, device_label(device), step_precision(fast.bf16, device.type))
    row.update({"model_tflops_s": m.flops_per_s / 1e12, "mfu": m.mfu, "mfu_precision": m.precision,
                "peak_tflops": None if m.peak_flops_per_s is None else m.peak_flops_per_s / 1e12})
    if profile > 0:
        row["profile"] = profile_steps(lambda: step(x0, t, noise), profile, device, row["ms_step"])
    del step, opt, ema, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def run_bench(preset: str, ratios: list[float], modes: dict[str, FastPath], batch: int, steps: int, warmup: int,
              device: torch.device, progress: bool = True, profile: int = 0, on_row=None,
              round_channels: int = 1, cache=None) -> list[dict]:
    """on_row(rows): called after every row (the CLI saves partial JSON, so a run cut short keeps its rows)."""
    rows = []
    for name, fast in modes.items():
        dense_its = None
        for r in ratios:
            row = bench_one(preset, r, fast, batch, steps, warmup, device, profile=profile,
                            round_channels=round_channels, cache=cache)
            row["mode_name"] = name
            if r == 0:
                dense_its, dense_macs = row["it_s"], row["macs"]
            if dense_its is not None:
                row["speedup_vs_dense"] = row["it_s"] / dense_its
                row["macs_ratio"] = dense_macs / row["macs"]
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            if progress:
                print(f"  {name:<10} ratio {r:.2f}: {row['it_s']:.1f} it/s ({row['ms_step']:.2f} ms/step, "
                      f"{format_flops(row['model_tflops_s'] * 1e12)}, MFU {format_mfu(row.get('mfu'))}, "
                      f"warm-up {row['warmup_s']:.1f} s{format_compile(row)})", flush=True)
    ref = {r["ratio"]: r["it_s"] for r in rows if r["mode_name"] == "eager"}
    for r in rows:
        if r["ratio"] in ref:
            r["speedup_vs_eager_same_ratio"] = r["it_s"] / ref[r["ratio"]]
        if 0.0 in ref:
            r["speedup_vs_eager_dense"] = r["it_s"] / ref[0.0]
    return rows


def available_modes(device: torch.device, compile_mode: str | None = None) -> dict[str, FastPath]:
    """Every mode `bench` can run on this device; `default_mode_names` picks the ones run unasked.

    GPU: `eager` (fp32, the reference stack), `fast` (the trainer's GPU default), and for finding
    where the time goes `bf16` (the fast path without compilation: no compile time, eager kernels),
    `fast-nograph` (compiled without CUDA graphs: the graphs' share) and `fast-nobench` (without
    cuDNN autotuning); and the whole-step CUDA graph (`train.cuda_graph`): `graph` (eager kernels,
    nothing to compile), `graph-nocl` (the same in NCHW: eager GroupNorm on a GPU makes channels_last
    input contiguous, a copy each way) and `fast-graph` (inductor's kernels). Against cuDNN's layout copies
    (issue 14): `fast-layout` and `fast-graph-layout` (inductor's channels-last layout optimisation forced,
    `train.layout_opt`) and `fast-nocl` (compiled in NCHW). CPU: `eager`, `cl` (channels_last), `compiled`
    (torch.compile, `--compile default` unless given) and `compiled-layout` (the same, layout forced)."""
    if device.type == "cuda":
        fast = FastPath(bf16=True, channels_last=True, compile=compile_mode or "reduce-overhead",
                        fused_optimizer=True, cudnn_benchmark=True)
        return {"eager": EAGER_FP32, "fast": fast, "bf16": replace(fast, compile="none"),
                "fast-nograph": replace(fast, compile="default"),
                "fast-nobench": replace(fast, cudnn_benchmark=False),
                "graph": replace(fast, compile="none", cuda_graph=True),
                "graph-nocl": replace(fast, compile="none", cuda_graph=True, channels_last=False),
                "fast-graph": replace(fast, compile="default", cuda_graph=True),
                "fast-layout": replace(fast, layout_opt=True),
                "fast-nocl": replace(fast, channels_last=False),
                "fast-graph-layout": replace(fast, compile="default", cuda_graph=True, layout_opt=True)}
    return {"eager": EAGER_FP32, "cl": replace(EAGER_FP32, channels_last=True),
            "compiled": replace(EAGER_FP32, compile=compile_mode or "default"),
            "compiled-layout": replace(EAGER_FP32, channels_last=True, compile=compile_mode or "default",
                                       layout_opt=True)}


def default_mode_names(device: torch.device, compile_mode: str | None = None) -> list[str]:
    if device.type == "cuda":
        return ["eager", "fast"]
    return ["eager", "cl"] + (["compiled"] if compile_mode and compile_mode != "none" else [])


def format_compile(row: dict) -> str:
    """", compile 12.3 s (cache hit)" for a compiled row, "" otherwise."""
    if row.get("compile_s") is None:
        return ""
    hit = {True: "cache hit", False: "cache miss", None: "no cache"}[row.get("compile_cache_hit")]
    return f", compile {row['compile_s']:.1f} s ({hit})"


def format_mfu(mfu: float | None, precision: str | None = None) -> str:
    """"9.4%" (or "9.4% bf16" with the peak's number format); "-" where the device's peak is unknown."""
    if mfu is None:
        return "-"
    return f"{100 * mfu:.1f}%" + (f" {precision}" if precision else "")


def format_table(rows: list[dict]) -> str:
    """One line per row; TFLOP/s are model FLOPs (6 x MACs x batch per step), MFU their share of the
    device's dense peak in the row's number format (`ebdiff.core.mfu`; "-" where the peak is unknown)."""
    lines = ["| mode | ratio | params | MACs | it/s | images/s | ms/step | model FLOP/s | MFU | peak mem | MACs ratio | speed-up vs dense (same mode) | vs eager dense | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, nd=2):
        return "-" if x is None else f"{x:.{nd}f}"

    for r in rows:
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**30:.2f} GiB"
        lines.append(f"| {r['mode']} | {r['ratio']:.2f} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e9:.2f}G | "
                     f"{f(r['it_s'], 1)} | {f(r['images_s'], 0)} | {f(r['ms_step'])} | "
                     f"{format_flops(None if r.get('model_tflops_s') is None else r['model_tflops_s'] * 1e12)} | "
                     f"{format_mfu(r.get('mfu'), r.get('mfu_precision'))} | {mem} | "
                     f"{f(r.get('macs_ratio'))}x | {f(r.get('speedup_vs_dense'))}x | "
                     f"{f(r.get('speedup_vs_eager_dense'))}x | {f(r['warmup_s'], 1)} |")
    return "\n".join(lines)


def taeb_rows(rows: list[dict], regions) -> list[dict]:
    """Per mode: each TA-EB region ticket's step speed-up over the dense model of that mode, and the
    slowest branch (the one that sets TA-EB's wall-clock time when every branch has its own device)."""
    out = []
    for mode in dict.fromkeys(r["mode_name"] for r in rows):
        by_ratio = {r["ratio"]: r for r in rows if r["mode_name"] == mode}
        branches = []
        for k, reg in enumerate(regions):
            r = by_ratio.get(reg.ratio)
            if r is None or r.get("speedup_vs_dense") is None:
                continue
            branches.append({"region": k, "t": [reg.lo, reg.hi], "ratio": reg.ratio, "it_s": r["it_s"],
                             "speedup_vs_dense": r["speedup_vs_dense"], "macs_ratio": r["macs_ratio"]})
        if branches:
            slow = min(branches, key=lambda b: b["it_s"])
            out.append({"mode_name": mode, "mode": by_ratio[regions[0].ratio]["mode"], "branches": branches,
                        "slowest_region": slow["region"], "slowest_speedup_vs_dense": slow["speedup_vs_dense"]})
    return out


def format_taeb(taeb: list[dict]) -> str:
    lines = ["| mode | region | t | ratio | it/s | MACs ratio | step speed-up vs dense |", "|---|---|---|---|---|---|---|"]
    for m in taeb:
        for b in m["branches"]:
            mark = " (slowest)" if b["region"] == m["slowest_region"] else ""
            lines.append(f"| {m['mode']} | {b['region']}{mark} | {b['t'][0]}-{b['t'][1]} | {b['ratio']:.2f} | "
                         f"{b['it_s']:.1f} | {b['macs_ratio']:.2f}x | {b['speedup_vs_dense']:.2f}x |")
    return "\n".join(lines)


def bench_settings(ratios: str, batch: int, steps: int, profile: int, round_channels: int, device: torch.device,
                   compile_mode: str | None, modes: str | None, taeb_config: str | None = None):
    """`ebdiff bench`'s options checked and resolved: (ratios with 0 = dense first and, with `taeb_config`, its
    regions' ratios; the TA-EB RegionSet or None; the modes to run by name). A bad option stops with one line."""
    from ..config import load_config
    from ..errors import ConfigError
    from ..training.taeb_spec import region_set

    try:
        rs = [float(r) for r in ratios.split(",")]
    except ValueError:
        raise ConfigError(f"--ratios must be comma-separated numbers; got {ratios!r}") from None
    if any(not 0 <= r < 1 for r in rs):
        raise ConfigError("--ratios must lie in [0, 1) (0 = dense)")
    regions = None
    if taeb_config:
        regions = region_set(load_config(taeb_config))
        rs += [r.ratio for r in regions if r.ratio not in rs]
    if 0.0 not in rs:
        rs = [0.0] + rs
    for k, v in (("batch", batch), ("steps", steps)):
        if v <= 0:
            raise ConfigError(f"--{k} must be positive")
    if profile < 0:
        raise ConfigError("--profile must be 0 (off) or a number of steps")
    if round_channels < 1:
        raise ConfigError("--round must be >= 1 (1 = the paper's ticket sizes)")
    available = available_modes(device, compile_mode)
    names = modes.split(",") if modes else default_mode_names(device, compile_mode)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"--modes: unknown {', '.join(unknown)} (available on {device.type}: "
                          f"{', '.join(available)})")
    return rs, regions, {n: available[n] for n in names}

"""EB-Diff-Train (TA-EB) launcher: one Early-Bird ticket per timestep region, branches trained in parallel.

- the branch spec (`taeb_spec.py`, pure): each region branch is an ordinary ebdiff run (dense search on the
  region's timesteps, ticket at the region's ratio, ticket training on those timesteps) in `RUN/region-k/`;
  the combined artifact is `RUN/regions.json` + each branch's checkpoints (`runs.folders` reads it, `interop.load`
  loads it);
- the launcher (here): branches run at the same time as separate processes under torch.distributed, the
  world split into one process group per region (data parallel inside a group). Without torchrun,
  `launch` starts `torch.distributed.run` on the worker entry point `python -m ebdiff.app.taeb_worker RUN`
  (one process per branch, or `taeb.procs_per_region`); under torchrun every rank runs `run_rank`;
- branches as independent jobs (`run_branch`: `ebdiff ta-eb --branch K`, one scheduler job per region, into
  the shared run folder; `combine`: `--combine RUN` checks that every branch finished and writes
  regions.json and taeb.json, what the one-launch mode writes at its end);
- the accounting (`RUN/taeb.json`, written by `finalize`): weighted params/MACs over the sampling steps, the
  longest branch (its arithmetic and text in `taeb_spec.py`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from ..config import Config, dump_yaml, load_config
from ..core.sampling import visited_timesteps
from ..errors import CheckpointError, ConfigError, Interrupted
from ..runs import checkpoint as ck
from ..runs.folders import REGIONS_FILE, read_regions, regions_record, taeb_run
from ..training.distributed import stop_requests
from ..training.taeb_spec import accounting_record, branch_config, branch_dir, region_set


def _train_branch(cfg: Config, run: Path, k: int, group=None) -> dict:
    from .assemble import train

    regions = region_set(cfg)
    d = branch_dir(run, k)
    resume = ck.latest_checkpoint(d) is not None
    return train(branch_config(cfg, regions[k]), d, resume=resume, group=group)


def write_layout(cfg: Config, run: Path) -> None:
    regions = region_set(cfg)
    run.mkdir(parents=True, exist_ok=True)
    ck.atomic_write_text(run / "config.yaml", dump_yaml(cfg))
    ck.atomic_write_json(run / REGIONS_FILE, regions_record(
        regions, cfg.taeb.route, [branch_dir(Path("."), k).name for k in range(len(regions))]))


def dist_backend(world: int, per_region: int, cuda: bool, n_gpus: int) -> str:
    """Backend of the TA-EB process group. NCCL refuses two ranks on one GPU ("Duplicate GPU
    detected"), so when the branches outnumber the GPUs they share them and coordinate over gloo;
    they only need a barrier then. Data parallelism inside a region (procs_per_region > 1) needs
    NCCL and one GPU per process."""
    if not cuda:
        return "gloo"
    if world <= n_gpus:
        return "nccl"
    if per_region > 1:
        raise ConfigError(f"ta-eb: taeb.procs_per_region={per_region} needs one GPU per process ({world}), "
                          f"but {n_gpus} are visible: set taeb.procs_per_region=1 (the branches then share "
                          f"the GPUs) or taeb.launch=sequential")
    return "gloo"


def _on_cuda(cfg: Config) -> bool:
    """Whether the branches train on GPUs (else on the CPU, one device for all)."""
    return torch.cuda.is_available() and cfg.train.device != "cpu"


def _backend_for(cfg: Config, world: int) -> str:
    cuda = _on_cuda(cfg)
    return dist_backend(world, cfg.taeb.procs_per_region, cuda, torch.cuda.device_count() if cuda else 0)


def run_rank(run: Path, cfg: Config | None = None) -> None:
    """Body of one torch.distributed process: join the region group of this rank and train that branch.
    cfg: the run's settings (None: read RUN/config.yaml, written by `launch`, the one record)."""
    import torch.distributed as dist

    cfg = cfg or load_config(Path(run) / "config.yaml")
    regions = region_set(cfg)
    per = cfg.taeb.procs_per_region
    if not dist.is_initialized():
        dist.init_process_group(_backend_for(cfg, int(os.environ.get("WORLD_SIZE", "1"))))
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != len(regions) * per:
        raise ConfigError(f"ta-eb: {world} processes but {len(regions)} regions x taeb.procs_per_region={per} "
                          f"= {len(regions) * per} are needed")
    groups = [dist.new_group(list(range(k * per, (k + 1) * per))) for k in range(len(regions))]
    k = rank // per
    _train_branch(cfg, run, k, group=groups[k])
    dist.barrier()
    dist.destroy_process_group()


def preflight(cfg: Config) -> None:
    """User errors that every branch would hit (a missing or unreadable dataset, a wrong preset for it)
    stop here with one line, before any process is started."""
    from ..data.datasets import preflight_training_data
    from ..training.distributed import resolve_device

    # and prepares data once for every branch (a latent preset's cache is encoded here)
    preflight_training_data(cfg.data, cfg.model, resolve_device(cfg.train.device))


def die_with_parent() -> None:
    """Linux: ask the kernel to send SIGTERM to this process when its parent dies (a killed launcher or
    torchrun agent leaves no orphan branch training on)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


LAUNCH_FILE = "launch.json"  # how the one-launch mode ran the branches: together or not, processes, devices


def launch(cfg: Config, run: Path) -> None:
    """Train all branches: under torchrun as one group per region; else start torch.distributed.run on
    the worker entry point and forward SIGINT/SIGTERM/SIGHUP to it (each branch saves and stops)."""
    regions = region_set(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one writer per node (nodes may not share a disk)
            write_layout(cfg, run)
        run_rank(run, cfg)
        return
    write_layout(cfg, run)
    nproc = len(regions) * cfg.taeb.procs_per_region
    together = cfg.taeb.launch != "sequential" and nproc > 1
    devices = torch.cuda.device_count() if _on_cuda(cfg) else 1
    ck.atomic_write_json(run / LAUNCH_FILE, {"together": together, "processes": nproc, "devices": devices,
                                             "shared": together and nproc > devices})
    if not together:
        for k in range(len(regions)):
            _train_branch(cfg, run, k)
        return
    _backend_for(cfg, nproc)  # a layout the GPUs cannot hold stops here, in one line, before launching
    env = dict(os.environ)
    if not _on_cuda(cfg):
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ebdiff.app.taeb_worker", str(run)]
    # its own session: a terminal's Ctrl-C reaches the launcher only, which stops the branches in order
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent, stderr=subprocess.PIPE)

    def forward(_signum):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    try:
        with stop_requests(forward) as got:
            def relay():  # the branches' stderr (progress bars, messages), silenced once a stop was asked for:
                while chunk := os.read(proc.stderr.fileno(), 65536):  # torchrun's traceback of the signal is noise
                    if not got:
                        sys.stderr.write(chunk.decode(errors="replace"))
                        sys.stderr.flush()

            relay_thread = threading.Thread(target=relay, daemon=True)
            relay_thread.start()
            rc = proc.wait()
            relay_thread.join(timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if got:
        raise Interrupted(f"ta-eb stopped by {signal.Signals(got[0]).name}: every branch saved a checkpoint and "
                          f"stopped; continue with: ebdiff ta-eb --resume {run}", code=128 + got[0])
    if rc != 0:
        raise ConfigError(f"ta-eb: a region branch failed (exit {rc}); fix the cause and rerun the same "
                          f"command with --resume {run}: finished branches are kept")


def run_taeb(cfg: Config, run: Path) -> dict | None:
    """`ebdiff ta-eb`: check the region set and the data, train every branch (`launch`) under the run's lock,
    then `finalize`; returns the accounting (None on a rank other than 0). A start that fails before any branch
    wrote a checkpoint leaves no half-made run folder."""
    region_set(cfg)  # a bad region set stops here, before anything is written
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        preflight(cfg)
    created = rank0 and not run.exists()
    try:
        with ck.RunLock(run, "ta-eb") if rank0 else contextlib.nullcontext():
            launch(cfg, run)
            return finalize(run) if rank0 else None
    except BaseException:
        if created and not any(run.glob("region-*/checkpoints/ckpt-*")):
            shutil.rmtree(run, ignore_errors=True)
        raise


def taeb_command(resume, config, out, overrides: list[str], branch: int | None = None,
                 combine_run: str | Path | None = None) -> tuple[Path, dict | None]:
    """`ebdiff ta-eb` in its three modes: every branch in one launch (`run_taeb`), one branch (`run_branch`)
    or the combination of finished branches (`combine`). Returns (run folder, the accounting; with a
    branch, its summary; None on a rank other than 0)."""
    if combine_run is not None:
        if branch is not None or config or out or resume or overrides:
            raise ConfigError("ta-eb --combine RUN takes no other option: the branches' settings are RUN's config.yaml")
        return Path(combine_run), combine(Path(combine_run))
    cfg, run = taeb_run(resume, config, out, overrides, first_launch=os.environ.get("WORLD_SIZE", "1") == "1")
    if branch is not None:
        return run, run_branch(cfg, run, branch, resume=bool(resume))
    return run, run_taeb(cfg, run)


# ---------------------------------------------------------------------- branches as independent jobs
def run_branch(cfg: Config, run: Path, k: int, resume: bool = False) -> dict:
    """`ebdiff ta-eb --branch K`: train region K's branch alone into the shared run folder (one scheduler job
    per branch, each with its own launch, failures and retries); `combine` makes the ensemble once every
    branch has finished. Every branch job writes the same RUN/config.yaml (a fresh one with other settings is
    refused); resume: continue this branch (RUN's config.yaml with the overrides, rewritten as one-launch
    --resume does). Returns the branch's summary."""
    regions = region_set(cfg)
    if not 0 <= k < len(regions):
        raise ConfigError(f"--branch {k}: the config has {len(regions)} regions (--branch 0 to {len(regions) - 1})")
    d, cfg_file, text = branch_dir(run, k), Path(run) / "config.yaml", dump_yaml(cfg)
    if not resume and ck.latest_checkpoint(d) is not None:
        raise ConfigError(f"{d} already holds a trained branch: continue it with --resume {run} --branch {k}")
    if not resume and cfg_file.is_file() and cfg_file.read_text() != text:
        raise ConfigError(f"{run} holds TA-EB branches of other settings (its config.yaml differs): give every "
                          f"branch job the same config and overrides, or continue with --resume {run} --branch {k}")
    preflight(cfg)
    run.mkdir(parents=True, exist_ok=True)
    ck.atomic_write_text(cfg_file, text)
    return _train_branch(cfg, run, k)


def unfinished(d: Path, iters: int) -> str | None:
    """Why the branch in folder `d` has not finished a budget of `iters` iterations (None: it has)."""
    if ck.latest_checkpoint(d) is None:
        return "has not started (no checkpoint)" if d.is_dir() else "is missing"
    s, last = ck.read_json(d / "summary.json"), int(ck.latest_checkpoint(d).name.removeprefix("ckpt-"))
    if s is None or s.get("stopped") is None or s["iterations"] != last:
        return f"has not finished (checkpoint at iteration {last}{', no summary.json' * (s is None)})"
    if s["stopped"] != "max_seconds" and s["iterations"] < iters:
        return f"has trained {s['iterations']} of its {iters} iterations"
    return None


def combine(run: Path) -> dict:
    """`ebdiff ta-eb --combine RUN`: check that every branch finished (`unfinished`; a branch still training is
    refused by its lock), then write regions.json and `finalize` (taeb.json, heatmaps, the ensemble's
    curve), as the one-launch mode does at its end. Returns the accounting."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--combine: {run} is not an ebdiff TA-EB run folder (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    regions = region_set(cfg)
    with ck.RunLock(run, "ta-eb --combine"), contextlib.ExitStack() as locks:
        for k, region in enumerate(regions):
            d = branch_dir(run, k)
            if d.is_dir():
                locks.enter_context(ck.RunLock(d, "ta-eb --combine"))
            why = unfinished(d, branch_config(cfg, region).train.iters)
            if why is not None:
                raise ConfigError(f"--combine: branch {k} ({d}) {why}: run ebdiff ta-eb --resume {run} --branch {k}")
        write_layout(cfg, run)
        return finalize(run)


# ---------------------------------------------------------------------- the combined artifact and accounting


def accounting(run: Path, cfg: Config) -> dict:
    """Weighted params/MACs (over the sampler's timesteps, and over all T), per-branch times, TA-EB time."""
    from ..backbones import count_macs_params

    regions, spec = read_regions(run)
    visited = visited_timesteps(cfg.sample, regions.T)
    branches = []
    for k, name in enumerate(spec["members"]):
        d = Path(run) / name
        s, t = ck.read_json(d / "summary.json"), ck.read_json(d / "ticket.json")
        if s is None:
            raise CheckpointError(f"{d} has not finished (no summary.json): rerun with --resume {run}")
        size = s.get("ticket") or s.get("dense")
        if size is None:
            m, _ = ck.load_model(ck.resolve_checkpoint(d))
            macs, params = count_macs_params(m)
            size = {"params": params, "macs": macs}
        times = s["time_s"]
        branches.append({
            "region": regions[k].to_dict(), "dir": name, "phase": s["phase"],
            "params": size["params"], "macs": size["macs"],
            "ticket_iteration": t["iteration"] if t else None, "ticket_found": bool(t and t.get("found", True)),
            "dense_iterations": s["dense_iterations"], "ticket_iterations": s["ticket_iterations"],
            "search_s": (t or {}).get("search_seconds", times["dense_s"] + times["check_s"]),
            "train_s": times["train_total"], "wall_s": times.get("wall_s"), "dense_s": times["dense_s"],
        })
    launched = ck.read_json(Path(run) / LAUNCH_FILE) or {}  # absent for branches trained as separate jobs
    res = accounting_record(regions, branches, spec["route"], cfg.sample, visited, bool(launched.get("shared")))
    ck.atomic_write_json(Path(run) / "taeb.json", res)
    return res


def plot_region_heatmaps(run: Path, path: Path) -> None:
    """The paper's Figure 4: each region's Hamming-distance matrix, side by side."""
    from ..evaluate.report import pyplot

    plt = pyplot()
    regions, spec = read_regions(run)
    fig, axes = plt.subplots(1, len(regions), figsize=(3.6 * len(regions), 3.4), squeeze=False)
    for ax, (k, name) in zip(axes[0], enumerate(spec["members"])):
        p = Path(run) / name / "hamming.npy"
        r = regions[k]
        if p.is_file():
            dm = np.load(p)
            im = ax.imshow(dm, cmap="viridis_r", vmin=0, interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            t = ck.read_json(Path(run) / name / "ticket.json") or {}
            c = t.get("check")
            if c is not None and t.get("found", True):
                ax.add_patch(plt.Rectangle((c - 0.5, c - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_title(f"t in [{r.lo}, {r.hi}], p={r.ratio}", fontsize=9)
        ax.set_xlabel("check")
    axes[0][0].set_ylabel("check")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def finalize(run: Path, progress: bool = True, log=print) -> dict:
    """After the branches: taeb.json, the regions' heatmaps and, with train.eval_every, the ensemble's
    quality curve (`training_eval.score_taeb_curve`)."""
    cfg = load_config(Path(run) / "config.yaml")
    a = accounting(run, cfg)
    plot_region_heatmaps(run, Path(run) / "hamming_regions.png")
    if cfg.train.eval_every is not None:
        from ..evaluate.training_eval import score_taeb_curve
        from ..training.distributed import resolve_device

        score_taeb_curve(run, resolve_device(cfg.train.device), progress=progress and cfg.train.progress, log=log)
    return a

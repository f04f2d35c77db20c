"""EB-Diff-Train (TA-EB): one Early-Bird ticket per timestep region, branches trained in parallel.

Three parts:
- the branch spec: each region branch is an ordinary ebdiff run (dense search on the region's
  timesteps, ticket at the region's ratio, ticket training on those timesteps) in `RUN/region-k/`;
  the combined artifact is `RUN/regions.json` + each branch's checkpoints (`interop.load` reads it);
- the launcher: branches run at the same time as separate processes under torch.distributed, the
  world split into one process group per region (data parallel inside a group). Without torchrun,
  `launch` starts `torch.distributed.run` on the worker entry point `python -m ebdiff.taeb_worker RUN`
  (one process per branch, or `taeb.procs_per_region`); under torchrun every rank runs `run_rank`;
- the accounting (`RUN/taeb.json`): weighted params/MACs over the sampling steps, the longest branch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ck
from .confine import inside
from .config import Config, dump_yaml, load_config
from .distributed import stop_requests
from .errors import CheckpointError, ConfigError, Interrupted
from .regions import Region, RegionSet
from .sampling import sampler_timesteps

REGIONS_FILE = "regions.json"


def region_set(cfg: Config) -> RegionSet:
    if not cfg.regions:
        raise ConfigError("ta-eb needs a 'regions' list in the config, e.g. regions: "
                          "[{t: [0, 260], ratio: 0.3}, {t: [240, 460], ratio: 0.6}, {t: [440, 999], ratio: 0.8}]")
    return RegionSet.from_config(cfg.regions, cfg.diffusion.timesteps)


def branch_config(cfg: Config, region: Region) -> Config:
    """The config of one region branch: its timesteps, ratio, eta and iteration budget."""
    c = copy.deepcopy(cfg)
    c.regions = None
    c.diffusion.t_min, c.diffusion.t_max = region.lo, region.hi
    c.early_bird.ratio = region.ratio
    if region.eta is not None:
        c.early_bird.eta = region.eta
    if region.iters is not None:
        c.train.iters = region.iters
    return c


def branch_dir(run: Path, k: int) -> Path:
    return Path(run) / f"region-{k}"


def _train_branch(cfg: Config, run: Path, k: int, group=None) -> dict:
    from .trainer import Trainer

    regions = region_set(cfg)
    d = branch_dir(run, k)
    resume = ck.latest_checkpoint(d) is not None
    return Trainer(branch_config(cfg, regions[k]), d, resume=resume, group=group).run()


def write_layout(cfg: Config, run: Path) -> None:
    regions = region_set(cfg)
    run.mkdir(parents=True, exist_ok=True)
    ck.atomic_write_text(run / "config.yaml", dump_yaml(cfg))
    ck.atomic_write_json(run / REGIONS_FILE, {
        "format": 1, "T": regions.T, "route": cfg.taeb.route, "regions": regions.to_config(),
        "members": [branch_dir(Path("."), k).name for k in range(len(regions))]})


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


def _backend_for(cfg: Config, world: int) -> str:
    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
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
    from .data import load_training_data
    from .distributed import resolve_device
    from .models import is_latent_preset

    latent = is_latent_preset(cfg.model.preset)  # and encodes a latent preset's cache once, for every branch
    load_training_data(cfg.data, cfg.model.preset, resolve_device(cfg.train.device) if latent else "cpu",
                       progress=latent, model=cfg.model)


def die_with_parent() -> None:
    """Linux: ask the kernel to send SIGTERM to this process when its parent dies (a killed launcher or
    torchrun agent leaves no orphan branch training on)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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
    if cfg.taeb.launch == "sequential" or len(regions) * cfg.taeb.procs_per_region == 1:
        for k in range(len(regions)):
            _train_branch(cfg, run, k)
        return
    nproc = len(regions) * cfg.taeb.procs_per_region
    _backend_for(cfg, nproc)  # a layout the GPUs cannot hold stops here, in one line, before launching
    env = dict(os.environ)
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ebdiff.taeb_worker", str(run)]
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


# ---------------------------------------------------------------------- the combined artifact and accounting
def is_taeb_run(path: Path) -> bool:
    return (Path(path) / REGIONS_FILE).is_file()


def read_regions(run: Path) -> tuple[RegionSet, dict]:
    try:
        spec = json.loads((Path(run) / REGIONS_FILE).read_text())
        regions = RegionSet.from_config(spec["regions"], spec["T"])
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{run}/{REGIONS_FILE} is unreadable ({type(exc).__name__})") from None
    for name in spec.get("members", ()):
        inside(run, name, f"{REGIONS_FILE} member")
    return regions, spec


def visited_timesteps(scfg, T: int) -> list[int]:
    return sampler_timesteps(scfg.sampler, T, scfg.steps, scfg.spacing)


def size_weightings(regions: RegionSet, params: list[float], macs: list[float], visited: list[int],
                    rule: str, sampler: str) -> dict:
    """Pure: TA-EB's params/MACs as one number, in the two ways they are reported, each with its definition:
    `sampling_steps` averages the region models over the timesteps the sampler visits (what sampling
    costs with these settings), `timesteps` over all T timesteps, each served by one region (uniform
    over T; what the paper's Table 4 reports: 7.69M / 1.32G for CIFAR-10's 30/60/80% regions, against
    13.11M / 2.25G by 100 quad-spaced DDIM steps)."""
    every_t = list(range(regions.T))
    return {
        "sampling_steps": {
            "definition": f"mean over the {len(visited)} timesteps the sampler visits ({sampler})",
            "params": regions.weighted(params, visited, rule), "macs": regions.weighted(macs, visited, rule),
            "steps_per_region": regions.steps_per_region(visited, rule)},
        "timesteps": {
            "definition": f"mean over all T={regions.T} timesteps, each served by one region (uniform over T; "
                          "the paper's Table 4)",
            "params": regions.weighted(params, every_t, rule), "macs": regions.weighted(macs, every_t, rule),
            "timesteps_per_region": regions.steps_per_region(every_t, rule)},
    }


def accounting(run: Path, cfg: Config) -> dict:
    """Weighted params/MACs (over the sampler's timesteps, and over all T), per-branch times, TA-EB time."""
    from .models import count_macs_params

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
            "train_s": times["train_total"], "wall_s": times.get("wall_s"),
        })
    rule = spec["route"]
    sc = cfg.sample
    sampler = f"{sc.sampler}, {sc.steps} steps, {sc.spacing} spacing" if sc.sampler == "ddim" else sc.sampler
    w = size_weightings(regions, [b["params"] for b in branches], [b["macs"] for b in branches], visited, rule,
                        sampler)
    res = {
        "route": rule, "sampler": {"sampler": sc.sampler, "steps": sc.steps, "spacing": sc.spacing},
        "steps_per_region": w["sampling_steps"]["steps_per_region"],
        # weighted_params / weighted_macs: by the sampling steps (weightings.sampling_steps), kept for readers
        "weighted_params": w["sampling_steps"]["params"], "weighted_macs": w["sampling_steps"]["macs"],
        "weightings": w,
        "branches": branches,
        "taeb_train_s": max(b["train_s"] for b in branches),
        "sum_train_s": sum(b["train_s"] for b in branches),
    }
    ck.atomic_write_json(Path(run) / "taeb.json", res)
    return res


def plot_region_heatmaps(run: Path, path: Path) -> None:
    """The paper's Figure 4: each region's Hamming-distance matrix, side by side."""
    from .report import pyplot

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


def format_accounting(a: dict) -> str:
    lines = ["region          ratio  ticket at   params      MACs   steps  search s  train s",
             "--------------  -----  ---------  --------  --------  -----  --------  -------"]
    for b, n in zip(a["branches"], a["steps_per_region"]):
        r = b["region"]
        tk = str(b["ticket_iteration"]) if b["ticket_found"] else "none"
        lines.append(f"[{r['t'][0]:>3}, {r['t'][1]:>3}]      {r['ratio']:5.2f}  {tk:>9}  {b['params'] / 1e6:7.2f}M "
                     f"{b['macs'] / 1e9:8.3f}G  {n:5d}  {b['search_s']:8.1f}  {b['train_s']:7.1f}")
    lines.append(f"weighted over the {sum(a['steps_per_region'])} sampling steps ({a['route']} routing): "
                 f"{a['weighted_params'] / 1e6:.2f}M params, {a['weighted_macs'] / 1e9:.3f}G MACs")
    t = (a.get("weightings") or {}).get("timesteps")
    if t:
        lines.append(f"weighted over all {sum(t['timesteps_per_region'])} timesteps ({'/'.join(map(str, t['timesteps_per_region']))} "
                     f"per region, the paper's Table 4): {t['params'] / 1e6:.2f}M params, {t['macs'] / 1e9:.3f}G MACs")
    lines.append(f"TA-EB training time (longest branch): {a['taeb_train_s']:.1f} s "
                 f"(all branches together {a['sum_train_s']:.1f} s)")
    return "\n".join(lines)


def finalize(run: Path, progress: bool = True, log=print) -> dict:
    """After the branches: taeb.json, the regions' heatmaps and, with train.eval_every, the ensemble's
    quality curve (`training_eval.score_taeb_curve`)."""
    cfg = load_config(Path(run) / "config.yaml")
    a = accounting(run, cfg)
    plot_region_heatmaps(run, Path(run) / "hamming_regions.png")
    if cfg.train.eval_every is not None:
        from .distributed import resolve_device
        from .training_eval import score_taeb_curve

        score_taeb_curve(run, resolve_device(cfg.train.device), progress=progress and cfg.train.progress, log=log)
    return a

"""Run folders, read: which kind a folder is and what it records, below every layer that reads one.

Three kinds of folder hold models: a run (`config.yaml`, `checkpoints/ckpt-N/`; a checkpoint folder's
run is two levels up), a TA-EB run (`regions.json` naming one run per region) and an exported model
folder (`ebdiff.json`, written by `interop.export`). This module only reads them (and formats the
regions record both TA-EB writers use); it imports no evaluation, interop or training code, so
`evaluate`, `interop`, `taeb` and `training_eval` all read runs through it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import Config, load_config
from ..core.regions import RegionSet
from ..errors import CheckpointError, ConfigError
from . import checkpoint as ck
from .confine import inside

REGIONS_FILE = "regions.json"  # marks a TA-EB run (and a TA-EB export): its regions and member folders
MANIFEST = "ebdiff.json"  # marks an exported folder
EXPORT_FORMAT = 1
EXPORT_KINDS = ("unet", "transformer", "ta-eb")  # one model (named as diffusers does), or TA-EB


def is_taeb_run(path: Path) -> bool:
    return (Path(path) / REGIONS_FILE).is_file()


def is_export(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def run_kind(path: Path) -> str:
    """`export`, `ta-eb` or `run` (a run or checkpoint folder): what `path` holds, by its marker file."""
    return "export" if is_export(path) else "ta-eb" if is_taeb_run(path) else "run"


def regions_record(regions: RegionSet, route: str, members: list[str]) -> dict:
    """The content of regions.json (pure): the region set, its routing rule and one folder per region."""
    return {"format": 1, "T": regions.T, "route": route, "regions": regions.to_config(), "members": list(members)}


def read_regions(run: Path) -> tuple[RegionSet, dict]:
    """The region set of a TA-EB run or export and its regions.json record (route, members)."""
    try:
        spec = json.loads((Path(run) / REGIONS_FILE).read_text())
        regions = RegionSet.from_config(spec["regions"], spec["T"])
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{run}/{REGIONS_FILE} is unreadable ({type(exc).__name__})") from None
    for name in spec.get("members", ()):
        inside(run, name, f"{REGIONS_FILE} member")
    return regions, spec


def read_manifest(path: Path) -> dict:
    """An export's manifest (kind, weights, members, route, source, size), checked for its format."""
    m = ck.read_json(Path(path) / MANIFEST)
    if not isinstance(m, dict) or m.get("format") != EXPORT_FORMAT or m.get("kind") not in EXPORT_KINDS:
        raise CheckpointError(f"{path}/{MANIFEST} is not an ebdiff export manifest (format {EXPORT_FORMAT})")
    for name in m.get("members") or ():
        inside(path, name, f"{MANIFEST} member")
    return m


def run_config(path: Path) -> Config:
    """A run's settings from their one record, the run folder's config.yaml (a checkpoint folder's run
    folder is two levels up)."""
    cfg = ck.run_folder(path) / "config.yaml"
    if not cfg.is_file():
        raise ConfigError(f"{path} is not an ebdiff run folder (no config.yaml)")
    return load_config(cfg)


def require_checkpoints(path: Path) -> None:
    """A run to sample must hold a checkpoint (every branch, for a TA-EB run); else one line, at once.
    (An exported model folder holds its weights itself.)"""
    kind = run_kind(path)
    if kind == "ta-eb":
        for name in read_regions(path)[1]["members"]:
            ck.resolve_checkpoint(Path(path) / name)
    elif kind == "run":
        ck.resolve_checkpoint(Path(path))


def train_run(resume: str | Path | None, config: str | Path | None, out: str | Path | None,
              overrides: list[str]) -> tuple[Config, Path]:
    """The settings and folder of `ebdiff train`: with `resume`, that run (or the most recently checkpointed run
    below it) and its config.yaml; else `config` and `out` (default runs/<timestamp>), which must not hold a run."""
    if resume:
        run_dir = ck.newest_run(Path(resume))
        if run_dir is None:
            raise ConfigError(f"--resume: {resume} is not an ebdiff run folder (no config.yaml) and holds no "
                              "run with a checkpoint")
        return load_config(run_dir / "config.yaml", overrides), run_dir
    cfg = load_config(config, overrides)
    run_dir = Path(out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a run folder")
    if ck.latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run: pass --resume {run_dir} to continue it, "
                          "or choose another --out")
    return cfg, run_dir


def taeb_run(resume: str | Path | None, config: str | Path | None, out: str | Path | None,
             overrides: list[str], first_launch: bool = True) -> tuple[Config, Path]:
    """The settings and folder of `ebdiff ta-eb`: with `resume`, that TA-EB run and its config.yaml; else
    `config` and `out` (default runs/taeb-<timestamp>), which must not hold a TA-EB run when this is the first
    launch (first_launch=False: a rank of a multi-node run, whose layout its rank 0 writes)."""
    if resume:
        run = Path(resume)
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"--resume: {run} is not an ebdiff TA-EB run folder (no config.yaml)")
        return load_config(run / "config.yaml", overrides), run
    cfg = load_config(config, overrides)
    run = Path(out or f"runs/taeb-{time.strftime('%Y%m%d-%H%M%S')}")
    if is_taeb_run(run) and first_launch:
        raise ConfigError(f"{run} already holds a TA-EB run: pass --resume {run} to continue it")
    return cfg, run

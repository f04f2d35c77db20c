"""Checkpoints without pickle: safetensors weights + JSON metadata + a weights-only training state.

Layout of a run folder:
    config.yaml                  resolved config
    metrics.jsonl                one JSON line per log interval / event
    checkpoints/ckpt-NNNNNNNNN/  model.safetensors, ema.safetensors, meta.json, state.pt
Every checkpoint folder is written under a temporary name and renamed into place, so a crash never
leaves a half-written checkpoint where a loader would pick it up. Only the last K are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import CheckpointError

FORMAT = 1


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_save(path: Path, save_fn) -> None:
    """Call save_fn(tmp_path), then rename tmp_path onto path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


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


def save_checkpoint(run_dir: Path, iteration: int, model: nn.Module, ema: nn.Module | None,
                    meta: dict[str, Any], state: dict[str, Any] | None, keep_last: int = 2,
                    extra_files: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically, then drop all but the newest `keep_last`."""
    from safetensors.torch import save_file

    final = ckpt_dir(run_dir, iteration)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        save_file(_state_dict_for_save(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_state_dict_for_save(ema), str(tmp / "ema.safetensors"))
        if state is not None:
            torch.save(state, tmp / "state.pt")
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "iteration": iteration, **meta},
                                                  indent=2, default=_json_default))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or unreadable (summary/ticket/eval files)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt} has no readable meta.json ({exc.__class__.__name__})") from None
    if meta.get("format") != FORMAT or "preset" not in meta:
        raise CheckpointError(f"checkpoint {ckpt} is not an ebdiff checkpoint (format {meta.get('format')!r})")
    return meta


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """The architecture a checkpoint describes: its preset, with its pruning plan replayed."""
    from .models import build_model
    from .pruning import apply_plan

    model = build_model(meta["preset"], meta.get("dropout", 0.1))
    if meta.get("plan"):
        apply_plan(model, [(n, list(i)) for n, i in meta["plan"]])
    return model


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read weights {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights {path} do not fit the architecture in meta.json: "
                              f"{str(exc).splitlines()[0]}") from None
    return model


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
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file, or one that needs unpickling code
        raise CheckpointError(f"cannot read training state {path}: {type(exc).__name__}") from None


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
    return ck

"""Files written whole or not at all, JSON records, and ebdiff's cache folder: the foundation every layer
that writes files uses (run folders, caches, reports, exports).

Every write goes to a temporary file in the destination folder and is renamed into place, so a crash never
leaves a half-written file where a reader would pick it up; the result gets the permissions a plain open()
would give under the umask.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def usual_mode(folder: bool = False) -> int:
    """The permissions a plain open() or mkdir() would give under the process's umask: what the files and
    folders that tempfile makes private (0600 / 0700) get before they are renamed into place, so that run
    folders, reports and exports stay readable by the user's group as any other file they write."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, usual_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def atomic_save(path: Path, save_fn) -> None:
    """Call save_fn(tmp_path), then rename tmp_path onto path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_fn(tmp)
        os.chmod(tmp, usual_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def json_line(rec: dict) -> str:
    """One record of a metrics.jsonl, newline included."""
    return json.dumps(rec, default=json_default) + "\n"


def json_default(o):
    """json.dumps(default=...) for tensors and numpy scalars."""
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or unreadable (summary/ticket/eval files)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def cache_dir() -> Path:
    return Path(os.environ.get("EBDIFF_CACHE", "~/.cache/ebdiff")).expanduser()

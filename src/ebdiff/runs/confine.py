"""Folders from others stay inside themselves: a path named inside a folder's own files (an export's
`ebdiff.json` members, a TA-EB `regions.json`, a run's checkpoints) must resolve, symbolic links
followed, to a place inside that folder."""

from __future__ import annotations

from pathlib import Path, PurePath

from ..errors import CheckpointError


def inside(folder: str | Path, rel: str | PurePath, what: str) -> Path:
    """folder / rel, or CheckpointError (one line naming `what`) when rel is not a relative path or leads
    outside `folder` (through '..', an absolute path or a symbolic link)."""
    if not isinstance(rel, (str, PurePath)) or not str(rel) or PurePath(rel).is_absolute():
        raise CheckpointError(f"{what} {rel!r} in {folder} is not a relative path inside it: refused")
    folder = Path(folder)
    target = folder / rel
    if not target.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"{what} {str(rel)!r} leads outside {folder} (to {target.resolve()}): refused")
    return target

"""Bad images found before training: every file of a streamed image dataset is opened and its header
verified (PIL's `Image.open` + `verify`, in a thread pool) when the data is loaded, so that
`data.bad_images=error` stops before the first iteration with one line naming the first bad file, and
`skip` leaves the bad ones out up front (and the run's summary counts them). The verdicts are kept in
the cache folder (`data.cache_dir`, default ~/.cache/ebdiff) by file size and modification time: the
next run checks only the files that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import DataError
from ..files import atomic_write_text, read_json
from ..files import cache_dir as files_cache_dir
from ..progress import progress_bar

THREADS = min(32, 4 * (os.cpu_count() or 1))  # opening headers waits on the disk more than on the CPU


def check_file(path: Path) -> str | None:
    """None for a file whose image header reads, else why not (one line)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def _record_path(cache_dir: str | None, files: list[Path]) -> Path:
    h = hashlib.sha1(str(Path(files[0]).resolve().parent).encode() + f"|{len(files)}".encode())
    base = Path(cache_dir).expanduser() if cache_dir else files_cache_dir()
    return base / f"imagecheck-{h.hexdigest()[:16]}.json"


def _read_record(path: Path) -> dict:
    rec = read_json(path)  # None: none yet, or damaged: everything is checked again
    return rec if isinstance(rec, dict) else {}


def _stamp(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def check_images(files: list[Path], bad_images: str = "error", cache_dir: str | None = None,
                 progress: bool = True) -> tuple[list[Path], int]:
    """(the readable files in order, how many were left out). bad_images=error: DataError naming the first
    unreadable file (and how many there are) instead."""
    if not files:
        return files, 0
    record_path = _record_path(cache_dir, files)
    known = _read_record(record_path)
    keys = [str(Path(p).resolve()) for p in files]
    stamps = [_stamp(Path(p)) for p in files]
    todo = [i for i, (k, s) in enumerate(zip(keys, stamps)) if known.get(k, [None])[:2] != s]
    with ThreadPoolExecutor(THREADS) as pool:
        found = list(progress_bar(pool.map(check_file, [files[i] for i in todo]), total=len(todo),
                                  desc="checking images", disable=not progress or len(todo) < 1000, leave=False))
    for i, why in zip(todo, found):
        known[keys[i]] = [*stamps[i], why]
    if todo:
        try:
            atomic_write_text(record_path, json.dumps(known))
        except OSError:
            pass  # a read-only cache only checks again next time
    bad = [i for i, k in enumerate(keys) if known[k][2] is not None]
    if bad and bad_images != "skip":
        first = files[bad[0]]
        raise DataError(f"cannot read image {first} ({known[keys[bad[0]]][2]})"
                        + (f" and {len(bad) - 1} more of {len(files)}" if len(bad) > 1 else "")
                        + "; remove them, or set data.bad_images=skip to leave unreadable images out")
    if bad:
        where = os.path.commonpath([files[0], files[-1]]) if len(files) > 1 else Path(files[0]).parent
        print(f"ebdiff: left out {len(bad)} unreadable image(s) of {len(files)} under {where}", file=sys.stderr)
    skip = set(bad)
    return [p for i, p in enumerate(files) if i not in skip], len(bad)

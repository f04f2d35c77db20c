"""A persistent, portable torch.compile cache: compile a model shape once, load it in seconds afterwards.

One folder (`train.compile_cache`; default $EBDIFF_COMPILE_CACHE, else ~/.cache/ebdiff/compile; `none`
turns it off) holds three things:

    inductor/<torch>-<device kind>/   TORCHINDUCTOR_CACHE_DIR: inductor's own on-disk caches (FX graphs,
                                      AOTAutograd entries and the compiled kernels: C++ .so on the CPU,
                                      Triton cubins on a GPU)
    artifacts/<key>.bin               PyTorch's portable "mega-cache" (torch.compiler.save_cache_artifacts)
                                      of a shape's first compiled step: one file per key
    timings/<key>.json                measured seconds of that step (steady step, first step, compile
                                      hit or miss), read by `train.compile=auto` (ebdiff.training.autocompile)

Why both caches (measured with torch 2.14.1 on this project's 2-core CPU, tiny preset's step, fresh
processes): the mega-cache restores the graph entries but, on the CPU, not the compiled C++ kernels,
so a "hit" still runs g++: 113 s instead of 161-168 s. Inductor's own folder keeps the kernels: a
second compile took 7-11 s, also after the folder was copied to another path. So the inductor folder
is what makes a shape compile in seconds on the machine that keeps it. On a GPU the mega-cache bundles
the Triton kernels (inductor's bundle_triton_into_fx_graph_cache, on by default), so its few-MB file
per shape is the portable part: carried to a fresh machine of the same kind (whose inductor folder is
empty, e.g. a device run that can only carry 64 MiB), `load_artifacts` writes its entries into the
local caches before the step compiles. Inductor validates every entry itself (graph, torch and
Triton versions, device, compiler settings), so a stale or foreign file is a miss, never wrong code;
the key below only chooses which file to load.

Keys: torch (and Triton, Python) version, device kind (GPU model, compute capability and CUDA build;
or CPU architecture and vector ISA), the model class and every parameter/buffer shape and dtype (a
dense model and each ticket differ), the fast-path settings and what the graph is specialised to
(batch shape, dropout, loss reduction).

A folder that cannot be written gives one warning line and the run goes on without the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..files import atomic_save


def warn(msg: str) -> None:
    """One line on stderr (the run goes on)."""
    print(f"ebdiff: warning: {msg}", file=sys.stderr, flush=True)


ENV_DIR = "EBDIFF_COMPILE_CACHE"
_warned: set[str] = set()
_ours: set[str] = set()  # TORCHINDUCTOR_CACHE_DIR values this process set


def user_inductor_dir() -> str | None:
    """TORCHINDUCTOR_CACHE_DIR when the user chose it: set, not by ebdiff, and not inductor's default (which
    inductor writes into the environment at its first compilation)."""
    cur = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cur or cur in _ours:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if os.path.abspath(cur) == os.path.abspath(default_cache_dir()):
            return None
    except ImportError:
        pass
    return cur


def default_dir() -> Path:
    """$EBDIFF_COMPILE_CACHE, else $XDG_CACHE_HOME/ebdiff/compile, else ~/.cache/ebdiff/compile."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ebdiff" / "compile"


def resolve_dir(setting: str | None) -> Path | None:
    """The folder a `train.compile_cache` setting names: `auto` (or empty) = default_dir(), `none` = off."""
    if setting is None or str(setting).strip().lower() in ("", "auto"):
        return default_dir()
    if str(setting).strip().lower() in ("none", "off", "false", "no"):
        return None
    return Path(setting).expanduser()


def device_kind(device: torch.device | str | None = None) -> str:
    """What compiled code depends on besides torch: "cuda:NVIDIA H200:sm90:cu13.0" or "cpu:x86_64:AVX2"."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return f"cuda:{torch.cuda.get_device_name(idx)}:sm{major}{minor}:cu{torch.version.cuda}"
    if dev.type == "cpu":
        try:
            isa = torch.backends.cpu.get_cpu_capability()
        except Exception:  # noqa: BLE001 - an older torch without it
            isa = "unknown"
        return f"cpu:{platform.machine()}:{isa}"
    return dev.type


def shape_signature(models: torch.nn.Module | Iterable[torch.nn.Module]) -> list[list[Any]]:
    """[class, name, shape, dtype] of every parameter and buffer of one model or several (a TA-EB router's)."""
    ms = [models] if isinstance(models, torch.nn.Module) else list(models)
    sig = []
    for m in ms:
        sig.append([type(m).__name__])
        sig += [[n, list(p.shape), str(p.dtype).replace("torch.", "")] for n, p in m.named_parameters()]
        sig += [[n, list(b.shape), str(b.dtype).replace("torch.", "")] for n, b in m.named_buffers()]
    return sig


def _triton_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # noqa: BLE001 - no triton (CPU-only torch)
        return None


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._+" else "_" for c in s)[:60]


def cache_key(models: torch.nn.Module | Iterable[torch.nn.Module], settings: Mapping[str, Any] | None = None,
              device: torch.device | str | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """A file-name-safe key "<torch>-<device kind>-<hash>": the hash covers torch/Triton/Python versions,
    the device kind, `shape_signature(models)`, the fast-path `settings` and `extra` (what else the graph
    is specialised to). Values must be JSON-serialisable."""
    kind = device_kind(device)
    payload = {"torch": torch.__version__, "triton": _triton_version(),
               "python": f"{sys.version_info.major}.{sys.version_info.minor}", "device": kind,
               "shapes": shape_signature(models), "settings": dict(settings or {}), "extra": dict(extra or {})}
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return f"{_slug(torch.__version__)}-{_slug(kind)}-{h}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one (`files.atomic_save`), flushed to disk before the
    rename. Raises OSError."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_save(path, write)


def clear_recorded_artifacts() -> bool:
    """Empty torch's record of compile artifacts (what `save_cache_artifacts` returns). torch offers no
    public call for it: False (nothing done) where the private manager is missing or differs."""
    try:
        from torch.compiler._cache import CacheArtifactManager

        CacheArtifactManager.clear()
        return True
    except (ImportError, AttributeError):
        return False


def compile_counters() -> dict[str, int]:
    """Inductor's FX-graph and AOTAutograd cache hits/misses so far in this process (dynamo's counters)."""
    from torch._dynamo.utils import counters

    ind, aot = counters["inductor"], counters["aot_autograd"]
    return {"fx_hit": int(ind.get("fxgraph_cache_hit", 0)), "fx_miss": int(ind.get("fxgraph_cache_miss", 0)),
            "aot_hit": int(aot.get("autograd_cache_hit", 0)), "aot_miss": int(aot.get("autograd_cache_miss", 0))}


def was_hit(before: dict[str, int], after: dict[str, int]) -> bool | None:
    """Whether the compilations between two `compile_counters()` were served from the cache: True (hits,
    no miss), False (a miss), None (no cache lookup at all, e.g. the cache is off)."""
    d = {k: after[k] - before.get(k, 0) for k in after}
    if d["fx_miss"] or d["aot_miss"]:
        return False
    if d["fx_hit"] or d["aot_hit"]:
        return True
    return None


class CompileCache:
    """The cache folder of one process: `activate()` once before the first compilation, then per key
    `load_artifacts` before a shape's first compiled step, `save_artifacts` after it, and the timing
    records. Every I/O failure is one warning line (per folder) and the run goes on."""

    def __init__(self, folder: str | os.PathLike, device: torch.device | str | None = None):
        self.folder = Path(folder).expanduser()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.ok = True
        self.inductor_dir: str | None = None

    @classmethod
    def from_setting(cls, setting: str | None, device) -> "CompileCache | None":
        d = resolve_dir(setting)
        return None if d is None else cls(d, device)

    # ------------------------------------------------------------------ folder
    def _warn(self, what: str, exc: BaseException | None = None) -> None:
        self.ok = False
        if str(self.folder) not in _warned:
            _warned.add(str(self.folder))
            why = f" ({getattr(exc, 'strerror', None) or exc})" if exc is not None else ""
            warn(f"compile cache: {what} {self.folder}{why}; compiling without it (set train.compile_cache to a "
                 "writable folder, or none)")

    def activate(self) -> bool:
        """Check that the folder can be written and point inductor's on-disk cache into it (unless the
        user set TORCHINDUCTOR_CACHE_DIR). Must run before the process's first compilation to keep the
        compiled kernels; idempotent. False (after one warning) when the folder is unusable."""
        if not self.ok:
            return False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            self._warn("cannot write the folder", e)
            return False
        user = user_inductor_dir()
        if user:
            self.inductor_dir = user
        else:
            d = str(self.folder / "inductor" / f"{_slug(torch.__version__)}-{_slug(device_kind(self.device))}")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
            _ours.add(d)
            self.inductor_dir = d
        return True

    def artifact_path(self, key: str) -> Path:
        return self.folder / "artifacts" / f"{key}.bin"

    def timing_path(self, key: str) -> Path:
        return self.folder / "timings" / f"{key}.json"

    # ------------------------------------------------------------------ mega-cache
    def has_artifacts(self, key: str) -> bool:
        try:
            return self.artifact_path(key).is_file()
        except OSError:
            return False

    def load_artifacts(self, key: str) -> dict[str, int] | None:
        """Write the key's saved artifacts into the local caches, before the shape's first compiled step.
        {artifact kind: count}, or None (no file, or a file torch cannot read: one warning)."""
        if not self.ok:
            return None
        f = self.artifact_path(key)
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn("cannot read", e)
            return None
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file is a miss, never fatal
            warn(f"compile cache: {f} is not a loadable artifact file ({e}); compiling without it")
            return None
        if info is None:
            warn(f"compile cache: torch {torch.__version__} could not read {f}; compiling without it")
            return None
        return {k: len(v) for k, v in info.artifacts.items()}

    def save_artifacts(self, key: str) -> Path | None:
        """Save the compile artifacts recorded since the previous save under `key`, after the shape's first
        full compiled step (forward, loss, backward: the backward is compiled at the first .backward()).

        torch's recorder is cumulative over the process; it is cleared after each save so that every
        file holds its own shape only (a few MB each on a GPU instead of files that grow with every
        shape of a run). Where torch lacks the recorder's `clear`, the files stay cumulative, which is
        still correct (each file then also serves the shapes compiled before it). A file that already
        holds exactly these bytes is not rewritten."""
        if not self.ok:
            return None
        res = torch.compiler.save_cache_artifacts()
        if res is None:
            return None
        data, _ = res
        f = self.artifact_path(key)
        try:
            if not (f.is_file() and f.stat().st_size == len(data) and f.read_bytes() == data):
                atomic_write_bytes(f, data)
        except OSError as e:
            self._warn("cannot write", e)
            return None
        clear_recorded_artifacts()
        return f

    # ------------------------------------------------------------------ timings
    def timings(self, key: str) -> dict:
        """The measured seconds recorded for `key` ({} when none): step_s (steady step), first_step_s,
        compile_miss_s / compile_hit_s (first step minus a steady one, on a cache miss / hit)."""
        try:
            return json.loads(self.timing_path(key).read_text())
        except (OSError, ValueError):
            return {}

    def record(self, key: str, **values: Any) -> None:
        """Merge measured values into the key's timing record (atomic; concurrent writers may lose an
        update, never corrupt the file: timings are hints)."""
        if not self.ok:
            return
        rec = self.timings(key)
        rec.update({k: v for k, v in values.items() if v is not None})
        rec.update({"torch": torch.__version__, "device": device_kind(self.device), "updated": time.time()})
        try:
            atomic_write_bytes(self.timing_path(key), json.dumps(rec, indent=1, sort_keys=True).encode())
        except OSError as e:
            self._warn("cannot write", e)

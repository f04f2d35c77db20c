"""Latent diffusion: the autoencoder stage, the latent cache on disk, decoding to pixels.

- `load_autoencoder(path)`: a diffusers `VQModel` (the paper's LDM: CompVis's VQ-f4) or `AutoencoderKL`
  from a local folder in diffusers format (config.json + safetensors weights; offline, nothing unpickled).
- `latent_training_data`: the data source `latents` (registered in `data.SOURCES`) of latent backbones.
- `LatentCache`: a dataset encoded once into shards `shard-NNNNN.npy` (float16 latents, unscaled) with their
  class labels `shard-NNNNN.labels.npy` and a `manifest.json`. Encoding resumes at the first missing shard,
  and one process encodes while the others wait (a lock file), so DDP ranks and TA-EB branches share it.
  Training reads the rows of each batch through memory maps (`LatentCache.read`): the latents stream from
  disk and never have to fit in memory (ImageNet's 1.28M latents of 3x64x64 are 31 GB).
- The scale factor (latents are multiplied by it before diffusion, divided before decoding): `auto` = the
  autoencoder's convention (1.0 for a VQ model, as CompVis's VQ LDMs; `scaling_factor` of an AutoencoderKL's
  config), `std` = 1 / the standard deviation of the first shard's latents (LDM's scale_by_std), or a number.
  A run records the one it used (`latent.scale` in its checkpoints' meta.json).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..backbones import ModelSpec
from ..errors import ConfigError, DataError
from ..files import atomic_save, atomic_write_json, cache_dir
from ..progress import progress_bar
from .datasets import ImageData, load_dataset, register_source, to_model_range

AUTOENCODERS = {"VQModel": "vq", "AutoencoderKL": "kl"}  # diffusers class -> kind
CACHE_FORMAT = 1
AE_HINT = {
    "ldm-imagenet256": "LDM's VQ-f4 autoencoder (3x64x64 latents of 256x256 images) as a diffusers VQModel folder, "
                       "e.g. the vqvae/ folder of the Hugging Face repository CompVis/ldm-celebahq-256 (the same "
                       "VQ-f4 architecture: 8192 codes, 3 latent channels), or latent-diffusion's vq-f4 checkpoint "
                       "converted to diffusers",
}


# ---------------------------------------------------------------------- the autoencoder
class Autoencoder:
    """A diffusers autoencoder with one interface: `encode(x)` -> unscaled latents (a VQ model's latents
    before quantisation, as LDM trains on; a KL model's posterior mean), `decode(z)` -> images (a VQ model
    quantises first, as LDM's decode_first_stage)."""

    def __init__(self, model: nn.Module, kind: str, path: str):
        self.model, self.kind, self.path = model.eval().requires_grad_(False), kind, path

    @property
    def factor(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def image_channels(self) -> int:
        return int(self.model.config.in_channels)

    def default_scale(self) -> float:
        return 1.0 if self.kind == "vq" else float(self.model.config.scaling_factor)

    def to(self, device) -> "Autoencoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "vq":
            return self.model.encode(x).latents
        return self.model.encode(x).latent_dist.mode()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z).sample


def autoencoder_missing(path: str | None, preset: str) -> str:
    need = AE_HINT.get(preset, "a diffusers VQModel or AutoencoderKL folder (config.json + "
                               "diffusion_pytorch_model.safetensors)")
    if not path:
        return f"model.preset={preset} trains on latents: set model.autoencoder=PATH to {need}"
    return f"model.autoencoder={path} not found: it must be {need}"


def load_autoencoder(path: str | None, preset: str = "", device: torch.device | str = "cpu") -> Autoencoder:
    """The autoencoder in a local diffusers folder; a missing or unusable folder stops with one line."""
    import diffusers

    if not path or not (Path(path).expanduser() / "config.json").is_file():
        raise ConfigError(autoencoder_missing(path, preset))
    folder = Path(path).expanduser()
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        raise ConfigError(f"model.autoencoder={path}: config.json is unreadable") from None
    if name not in AUTOENCODERS:
        raise ConfigError(f"model.autoencoder={path} is a {name}, not one of {', '.join(AUTOENCODERS)}")
    try:
        model = getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.autoencoder={path}: cannot load the {name} ({first}); ebdiff reads "
                          "safetensors weights only") from None
    return Autoencoder(model, AUTOENCODERS[name], str(folder)).to(device)


def check_autoencoder(ae: Autoencoder, spec: ModelSpec, image_size: int) -> tuple[int, int]:
    """The latent (channels, size) of `image_size` images, which the model fits (`ModelSpec.fit`: a preset adapts
    to them, a model.config must match them), checked before anything is encoded."""
    if image_size % ae.factor:
        raise ConfigError(f"image size {image_size} is not a multiple of the autoencoder's factor {ae.factor}")
    shape = (ae.latent_channels, image_size // ae.factor)
    spec.fit(shape, f"model.autoencoder={ae.path} on {image_size}x{image_size} images", factor=ae.factor)
    return shape


def resolve_scale(setting: Any, ae: Autoencoder, cache: "LatentCache") -> float:
    if setting == "auto":
        return ae.default_scale()
    if setting == "std":
        return 1.0 / cache.manifest["std"]
    try:
        value = float(setting)
    except (TypeError, ValueError):
        raise ConfigError(f"model.latent_scale must be auto, std or a number; got {setting!r}") from None
    if not value > 0:
        raise ConfigError(f"model.latent_scale must be positive; got {value}")
    return value


# ---------------------------------------------------------------------- the latent cache
def cache_root(setting: str | None) -> Path:
    return Path(setting).expanduser() if setting else cache_dir() / "latents"


def cache_identity(dcfg, image_size: int, ae: Autoencoder) -> dict:
    """What the cached latents depend on: the images (dataset, where, split, size, limit) and the autoencoder
    (its folder, config and weights file)."""
    folder = Path(ae.path)
    weights = sorted(p for p in folder.glob("*.safetensors"))
    return {"dataset": dcfg.name, "root": str(Path(dcfg.root).expanduser().resolve()) if dcfg.root else None,
            "split": dcfg.split, "image_size": image_size, "resize": dcfg.resize, "limit": dcfg.limit,
            "lsun_category": dcfg.lsun_category if dcfg.name == "lsun" else None,
            "autoencoder": str(folder.resolve()),
            "autoencoder_config": hashlib.sha1((folder / "config.json").read_bytes()).hexdigest(),
            "autoencoder_weights": [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in weights]}


class LatentCache:
    """A folder of latent shards (see the module doc). `read(idx)` gathers rows by global index."""

    MANIFEST = "manifest.json"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / self.MANIFEST).read_text())
        except (OSError, ValueError):
            raise DataError(f"latent cache {self.folder} has no readable {self.MANIFEST}: encode it again "
                            "(remove the folder)") from None
        if self.manifest.get("format") != CACHE_FORMAT or not self.manifest.get("complete"):
            raise DataError(f"latent cache {self.folder} is incomplete or of another format: encode it again")
        self.shards = [np.load(self.folder / f, mmap_mode="r") for f in self.manifest["shards"]]
        labels = [np.load(self.folder / shard_labels(f)) for f in self.manifest["shards"]]
        self.labels = torch.from_numpy(np.concatenate(labels).astype(np.int64))
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.scale = 1.0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["shape"])

    def read(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled float32 latents, labels) of the rows `idx` (global indices, in their order)."""
        idx = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((len(idx), *self.shape), dtype=np.float32)
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            out[sel] = self.shards[k][idx[sel] - self.offsets[k]]
        x = torch.from_numpy(out)
        if self.scale != 1.0:
            x.mul_(self.scale)
        return x, self.labels[torch.from_numpy(idx)]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


def shard_labels(name: str) -> str:
    return name.replace(".npy", ".labels.npy")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add .npy to a temporary name
            np.save(f, arr, allow_pickle=False)

    atomic_save(path, write)


def _rows_of(path: Path) -> int | None:
    try:
        return len(np.load(path, mmap_mode="r"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(folder: Path):
    """One encoder per cache folder: other processes (DDP ranks, TA-EB branches) wait here, then find it done."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):  # a file system without flock: go on unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def encode_dataset(data, ae: Autoencoder, folder: Path, identity: dict, shard_size: int, device,
                   batch: int = 64, progress: bool = True, num_workers: int = 2) -> LatentCache:
    """Encode `data` (a `data.ImageData`, in memory or streamed from files) into `folder` unless it is already
    complete; shards already written are kept (an interrupted encoding resumes)."""
    folder = Path(folder)
    with _locked(folder):
        man_path = folder / LatentCache.MANIFEST
        if man_path.is_file():
            man = json.loads(man_path.read_text())
            if man.get("complete") and man.get("identity") == identity:
                return LatentCache(folder)
        if data.labels is None:
            labels_all = torch.full((len(data),), -1, dtype=torch.long)
        else:
            labels_all = data.labels.cpu()
        n = len(data)
        names = [shard_name(k) for k in range(-(-n // shard_size))]
        ae.to(device)
        todo = [k for k, f in enumerate(names) if _rows_of(folder / f) != min(shard_size, n - k * shard_size)
                or _rows_of(folder / shard_labels(f)) != min(shard_size, n - k * shard_size)]
        bar = progress_bar(total=n, initial=n - sum(min(shard_size, n - k * shard_size) for k in todo),
                   desc=f"encoding latents ({ae.kind})", disable=not progress, dynamic_ncols=True)
        for k in todo:
            lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
            parts = []
            for x in _image_batches(data, lo, hi, batch, num_workers):
                z = ae.encode(to_model_range(x.to(device)))
                parts.append(z.float().cpu().numpy().astype(np.float16))
                bar.update(len(x))
            _save_npy(folder / shard_labels(names[k]), labels_all[lo:hi].numpy())
            _save_npy(folder / names[k], np.concatenate(parts))
        bar.close()
        first = np.load(folder / names[0], mmap_mode="r")
        atomic_write_json(man_path, {
            "format": CACHE_FORMAT, "complete": True, "identity": identity, "kind": ae.kind, "n": n,
            "shape": list(first.shape[1:]), "dtype": "float16", "shard_size": shard_size, "shards": names,
            "std": float(np.asarray(first, dtype=np.float64).std()),
            "mean": float(np.asarray(first, dtype=np.float64).mean()),
            "default_scale": ae.default_scale()})
    return LatentCache(folder)


def _image_batches(data, lo: int, hi: int, batch: int, num_workers: int):
    """uint8 image batches of rows lo..hi-1, in order (in memory, or read by a DataLoader)."""
    if data.images is not None:
        for i in range(lo, hi, batch):
            yield data.images[i: min(hi, i + batch)]
        return
    sub = torch.utils.data.Subset(data.files_dataset, range(lo, hi))
    yield from torch.utils.data.DataLoader(sub, batch_size=batch, num_workers=num_workers)


def latent_training_data(dcfg, mcfg, device, progress: bool = True):
    """The run's training data as latents: load the autoencoder, encode the dataset once (or find its cache),
    return a `data.ImageData` whose rows are read from the cache, with `latent` = what the run records."""
    spec = ModelSpec.of(mcfg)
    if dcfg.hflip:
        raise ConfigError("data.hflip=true: flips are not applied in latent space (the latents are encoded once); "
                          "leave data.hflip unset for latent presets")
    ae = load_autoencoder(mcfg.autoencoder, mcfg.preset if spec.preset else "")
    c, size = ae.image_channels, dcfg.image_size or spec.image_shape(ae.factor)[1]  # the images it encodes
    check_autoencoder(ae, spec, size)
    identity = cache_identity(dcfg, size, ae)
    key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root(dcfg.latent_cache) / f"{dcfg.name}-{size}-{ae.kind}-{key}"
    cache = None
    if (folder / LatentCache.MANIFEST).is_file():
        with contextlib.suppress(DataError):
            cache = LatentCache(folder)
            if cache.manifest.get("identity") != identity:
                cache = None
    if cache is None:
        pixels = load_dataset(dcfg, size, progress=progress)
        if pixels.shape[0] != c:
            raise ConfigError(f"model.autoencoder={ae.path} encodes {c}-channel images but data.name={dcfg.name} "
                              f"gives {pixels.shape[0]} channels: choose an autoencoder for {pixels.shape[0]} channels")
        enc_device = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
        cache = encode_dataset(pixels, ae, folder, identity, dcfg.latent_shard_size, enc_device,
                               progress=progress, num_workers=dcfg.num_workers)
    cache.scale = resolve_scale(mcfg.latent_scale, ae, cache)
    latent = {"autoencoder": ae.path, "kind": ae.kind, "scale": cache.scale, "cache": str(folder),
              "image_shape": [c, size, size]}
    return ImageData(labels=cache.labels, rows=cache, name=dcfg.name, latent=latent)


register_source("latents", latent_training_data)  # what latent backbones (`Backbone.latent`) train on


def image_size(dcfg, mcfg) -> int:
    """The size of the images a run trains on (a latent run: the images its autoencoder encodes): data.image_size,
    else its model's (a latent model.config's: its sample_size x its autoencoder's factor)."""
    spec = ModelSpec.of(mcfg)
    if dcfg.image_size:
        return dcfg.image_size
    factor = load_autoencoder(mcfg.autoencoder).factor if spec.latent and spec.preset is None else None
    return spec.image_shape(factor)[1]


# ---------------------------------------------------------------------- decoding
class LatentDecoder:
    """Latents (scaled, as the UNet makes them) -> images in [-1, 1], in batches, on a device."""

    def __init__(self, latent: dict, device: torch.device | str = "cpu", preset: str = ""):
        self.ae = load_autoencoder(latent["autoencoder"], preset, device)
        self.scale, self.device = float(latent["scale"]), device

    def __call__(self, z: torch.Tensor, batch: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(z), batch):
            x = self.ae.decode(z[i: i + batch].to(self.device) / self.scale)
            out.append(x.float().clamp(-1, 1).cpu())
        return torch.cat(out) if out else z.new_zeros((0,))


# ---------------------------------------------------------------------- a small autoencoder (tests, the CPU demo)
# Fashion-MNIST 1x32x32 -> 3x8x8 (VQ-f4, 3 latent channels as LDM's VQ-f4): 0.23M parameters
TINY_VQ = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
               latent_channels=3, num_vq_embeddings=256, vq_embed_dim=3, norm_num_groups=8, sample_size=32,
               mid_block_add_attention=False)


def save_autoencoder(model: nn.Module, folder: Path) -> Path:
    """A diffusers folder (config.json + safetensors), written under a temporary name and renamed."""
    import shutil
    import tempfile

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def train_autoencoder(images: torch.Tensor, folder: Path, steps: int = 1500, batch: int = 64, lr: float = 2e-3,
                      seed: int = 0, config: dict | None = None, progress: bool = True) -> dict:
    """Train a small VQ autoencoder (`TINY_VQ`) on uint8 images (reconstruction MSE + the quantiser's
    commitment and codebook losses, Adam) and save it as a diffusers folder; returns its test of
    reconstruction (mean squared error in [-1, 1] on the first 512 images, after quantisation)."""
    import time

    from diffusers import VQModel

    torch.manual_seed(seed)
    model = VQModel(**(config or TINY_VQ))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in progress_bar(range(steps), desc="autoencoder", disable=not progress, dynamic_ncols=True):
        x = to_model_range(images[torch.randint(len(images), (batch,), generator=g)])
        out = model(x)
        loss = torch.nn.functional.mse_loss(out.sample, x) + out.commit_loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        x = to_model_range(images[:512])
        mse = float(torch.nn.functional.mse_loss(model(x).sample.clamp(-1, 1), x))
    save_autoencoder(model, folder)
    return {"steps": steps, "seconds": time.perf_counter() - t0, "reconstruction_mse": mse, "path": str(folder)}


def describe_cache(data: ImageData, latent_scale, seconds: float) -> str:
    """What `ebdiff encode` prints of a latent training set: the cache, its shards, classes and scale."""
    lat, rows, n_classes = data.latent, data.rows, len(set(data.labels.tolist()) - {-1})
    return (f"latent cache {lat['cache']}: {len(rows)} latents of {'x'.join(map(str, rows.shape))} "
            f"({len(rows.shards)} shards, float16), {n_classes} classes; {lat['kind']} autoencoder {lat['autoencoder']}\n"
            f"latent std {rows.manifest['std']:.4f} (first shard); scale {lat['scale']:.5g} "
            f"(model.latent_scale={latent_scale}); {seconds:.1f} s")


"""Datasets as uint8 image tensors plus a deterministic, resumable batch stream.

Small datasets (Fashion-MNIST, CIFAR-10) are decoded once into a uint8 tensor [N, C, H, W] that can
live on the training device; batch b of epoch e is a fixed function of (seed, e, b), so a resumed run
sees exactly the batches it would have seen. Large datasets (CelebA, LSUN, image folders) are read
from files by a DataLoader with the same index order. Datasets are registered by name (`register_dataset`,
`DATASETS`: the loader, labelled or not, the default flips); what a run trains on comes from its backbone's
data source (`SOURCES`): pixels here, the rows of a latent cache from latents.py (which registers itself),
read per batch. Class labels (Fashion-MNIST, CIFAR-10, the class folders of an image
folder) travel with the images: `BatchStream(..., labels=True)` yields (images, labels).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..backbones import ModelSpec
from ..errors import ConfigError, DataError
from ..files import cache_dir as files_cache_dir
from ..progress import progress_bar, tqdm
from .imagecheck import check_images

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)
def _read_idx(path: Path) -> np.ndarray:
    import zlib

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path} is corrupt or truncated ({exc}): reinstall it (apt-get install --reinstall "
                        "dataset-fashion-mnist) or point data.root at good copies") from None
    if len(data) < 4:
        raise DataError(f"{path} is truncated ({len(data)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated ({arr.size} bytes of {int(np.prod(shape))})")
    return arr.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for sub in ("", "raw", "FashionMNIST/raw", "fashion-mnist"):
        for name in (stem, stem + ".gz"):
            p = folder / sub / name
            if p.is_file():
                return p
    return None


def fmnist_candidates(root: str | None) -> list[Path]:
    if root:  # an explicit root is the only place looked at
        return [Path(root).expanduser()]
    places = [DEBIAN_FMNIST]
    places.append(Path("~/.cache/ebdiff/fashion-mnist").expanduser())
    return places


def load_fashion_mnist(root: str | None, split: str = "train", size: int = 32, resize: str = "pad",
                       download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    places = fmnist_candidates(root)
    for folder in places:
        img, lab = _find_idx(folder, stems[0]), _find_idx(folder, stems[1])
        if img and lab:
            images, labels = _read_idx(img), _read_idx(lab)
            break
    else:
        images = labels = None
        if download:
            target = places[-1]
            try:
                from torchvision.datasets import FashionMNIST

                FashionMNIST(str(target), train=split == "train", download=True)
                return load_fashion_mnist(str(target), split, size, resize, download=False)
            except Exception:  # offline, or the mirrors refused
                pass
        looked = ", ".join(str(p) for p in places)
        raise DataError(
            f"Fashion-MNIST not found (looked in {looked}; download {'failed' if download else 'disabled'}): "
            "install it with 'apt-get install dataset-fashion-mnist' or pass data.root=DIR holding the four IDX files"
        )
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # N,1,28,28
    x = _fit(x, size, resize)
    return x, torch.from_numpy(labels.astype(np.int64))


def _fit(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    h = x.shape[-1]
    if h == size:
        return x.contiguous()
    if mode == "pad" and h < size:
        p = size - h
        return torch.nn.functional.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2)).contiguous()
    y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- image files
def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXT)


def _class_index(files: list[Path], folder: Path) -> torch.Tensor:
    classes = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    lookup = {c: i for i, c in enumerate(classes)}
    return torch.tensor([lookup.get(p.relative_to(folder).parts[0], -1) for p in files], dtype=torch.long)


def _decode(path: Path, size: int, crop: str) -> np.ndarray:
    from PIL import Image

    try:
        return decode_image(Image, path, size, crop)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "remove it, or set data.bad_images=skip to leave unreadable images out") from None


def decode_image(Image, path: Path, size: int, crop: str) -> np.ndarray:  # noqa: N803
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if crop == "celeba" and (w, h) == (178, 218):
            im = im.crop((25, 57, 25 + 140, 57 + 140))  # the DDIM/ reference CelebA crop
        else:
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.array(im, dtype=np.uint8)


def _cache_path(cache_dir: str | None, folder: Path, files: list[Path], size: int, crop: str) -> Path:
    h = hashlib.sha1()
    h.update(f"{folder.resolve()}|{size}|{crop}|{len(files)}".encode())
    for p in files[:: max(1, len(files) // 64)]:
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    base = Path(cache_dir).expanduser() if cache_dir else files_cache_dir()
    return base / f"images-{h.hexdigest()[:16]}.npz"


def load_image_folder(folder: Path, size: int, crop: str = "center", cache_dir: str | None = None,
                      limit: int | None = None, progress: bool = True,
                      bad_images: str = "error") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image under folder to uint8 [N, 3, size, size] (cached as .npz after the first time).
    bad_images: `error` stops at the first unreadable file (naming it), `skip` leaves such files out."""
    files = _list_images(folder)
    if not files:
        raise DataError(f"no images found under {folder}")
    if limit:
        files = files[:limit]
    cache = _cache_path(cache_dir, folder, files, size, crop)
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])
        except (OSError, ValueError, KeyError, EOFError):  # a damaged cache is rebuilt
            pass
    decoded, good = [], []
    for p in progress_bar(files, desc=f"decoding {folder.name}", disable=not progress):
        try:
            decoded.append(_decode(p, size, crop))
            good.append(p)
        except DataError:
            if bad_images != "skip":
                raise
    if len(good) < len(files):
        tqdm.write(f"ebdiff: left out {len(files) - len(good)} unreadable image(s) of {len(files)} under {folder}",
                   file=sys.stderr)
        files = good
    if not files:
        raise DataError(f"no readable images under {folder}")
    images = np.stack(decoded).transpose(0, 3, 1, 2).copy()
    labels = _class_index(files, folder).numpy()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache is only slower
    return torch.from_numpy(images), torch.from_numpy(labels)


class FileImageDataset(torch.utils.data.Dataset):
    """Streams images from files (CelebA, LSUN exports, ImageNet folders): too large to keep decoded.
    bad_images=skip: an unreadable file is replaced by the next readable one (and named on stderr)."""

    def __init__(self, files: list[Path], size: int, crop: str, bad_images: str = "error"):
        self.files, self.size, self.crop, self.bad_images = files, size, crop, bad_images

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        for j in range(i, i + min(len(self.files), 100)):
            try:
                return torch.from_numpy(_decode(self.files[j % len(self.files)], self.size, self.crop)).permute(2, 0, 1)
            except DataError as exc:
                if self.bad_images != "skip":
                    raise
                print(f"ebdiff: warning: skipped {exc}".split(";")[0], file=sys.stderr)
        raise DataError(f"100 unreadable images in a row from {self.files[i]} on: is this an image folder?")


class ImageRows:
    """Images i of a streamed dataset as a read-only sequence: `rows[a:b]` decodes those files into a uint8
    batch (a thread pool: PIL decodes without the GIL). The reference set of an evaluation on a dataset too
    large to hold in memory (ImageNet)."""

    def __init__(self, dataset: FileImageDataset, index: list[int], threads: int = 8):
        self.dataset, self.index, self.threads = dataset, list(index), threads

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, s: slice) -> torch.Tensor:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads) as pool:
            return torch.stack(list(pool.map(self.dataset.__getitem__, self.index[s])))

    def digest(self) -> str:
        """Names the set (the reference statistics' cache key): its files, sizes and decoding."""
        h = hashlib.sha1(f"{self.dataset.size}|{self.dataset.crop}|{len(self.index)}".encode())
        for i in self.index[:: max(1, len(self.index) // 256)]:
            p = self.dataset.files[i]
            h.update(f"{p}:{p.stat().st_size}".encode())
        return h.hexdigest()[:12]


def balanced_indices(labels: torch.Tensor, n: int) -> list[int]:
    """n indices, the first n // C of each of the C classes (labels < 0: one class), as Diff-Pruning's FID
    reference; all of them when n >= len(labels)."""
    if n >= len(labels):
        return list(range(len(labels)))
    classes = sorted(set(labels.tolist()))
    per = max(1, n // len(classes))
    out: list[int] = []
    for k in classes:
        out += torch.nonzero(labels == k).flatten()[:per].tolist()
    return sorted(out[:n])


def _load_cifar10(root: str | None, split: str, cache_dir: str | None, limit: int | None, progress: bool,
                  bad_images: str = "error"):
    places = [Path(root).expanduser()] if root else []
    places += [Path("data/cifar10"), Path("~/.cache/ebdiff/cifar10").expanduser()]
    for base in places:
        # torchvision's on-disk layout (cifar-10-batches-py)
        if (base / "cifar-10-batches-py").is_dir():
            from torchvision.datasets import CIFAR10

            ds = CIFAR10(str(base), train=split == "train", download=False)
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            y = torch.tensor(ds.targets, dtype=torch.long)
            return (x[:limit], y[:limit]) if limit else (x, y)
        # image-folder layout: <base>/{train,test}/<class>/*.jpg (optionally under cifar10-jpeg/)
        for cand in (base / split, base / "cifar10-jpeg" / split):
            if cand.is_dir():
                return load_image_folder(cand, 32, "center", cache_dir, limit, progress, bad_images)
    looked = ", ".join(str(p) for p in places)
    raise DataError(
        f"CIFAR-10 not found (looked in {looked}): pass data.root=DIR holding torchvision's "
        "cifar-10-batches-py or an image folder DIR/{train,test}/<class>/*.png"
    )


@dataclass(frozen=True)
class StreamedFolder:
    """The loader of a dataset streamed from image files under data.root (never downloaded): `places(base,
    dcfg)` are the folders looked in, in order (the first holding images serves); `crop` as `_decode`;
    `class_folders`: the first sub-folder of each image is its class; `hint(dcfg)`: how to get the files."""

    places: Callable[[Path, object], list[Path]]
    crop: str
    hint: Callable[[object], str]
    class_folders: bool = False

    def __call__(self, dcfg, size: int, progress: bool = True) -> "ImageData":
        if not dcfg.root:
            raise DataError(f"dataset '{dcfg.name}' needs data.root=DIR (it is never downloaded by ebdiff)")
        base = Path(dcfg.root).expanduser()
        cands = self.places(base, dcfg)
        for folder in cands:
            files = _list_images(folder) if folder.is_dir() else []
            if files:
                break
        else:
            raise DataError(f"no images for '{dcfg.name}' under {base} (looked in {', '.join(map(str, cands))}): "
                            f"{self.hint(dcfg)}")
        if dcfg.limit:
            files = files[: dcfg.limit]
        files, left_out = check_images(files, dcfg.bad_images, dcfg.cache_dir, progress)  # before any training
        labels = _class_index(files, folder) if self.class_folders else None
        data = ImageData(labels=labels, files_dataset=FileImageDataset(files, size, self.crop, dcfg.bad_images))
        data.left_out_images = left_out
        return data


class ImageData:
    """A dataset as uint8 images [N, C, H, W] (in memory), as image files (streamed), or as `rows` already in
    the model's range (a `latents.LatentCache`: `read(idx) -> (x, labels)`, with `latent` describing it).
    `labels`: one class index per item (-1: none), or None."""

    def __init__(self, images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 files_dataset: FileImageDataset | None = None, hflip: bool = False, name: str = "",
                 rows=None, latent: dict | None = None):
        self.images, self.labels, self.files_dataset = images, labels, files_dataset
        self.hflip, self.name, self.rows, self.latent = hflip, name, rows, latent

    def __len__(self) -> int:
        if self.rows is not None:
            return len(self.rows)
        return len(self.images) if self.images is not None else len(self.files_dataset)

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.rows is not None:
            return tuple(self.rows.shape)
        if self.images is not None:
            return tuple(self.images.shape[1:])
        return tuple(self.files_dataset[0].shape)

    def head(self, n: int) -> torch.Tensor:
        """The first n images as floats in the model's range [-1, 1] (a fixed scoring batch)."""
        if self.rows is not None:
            return self.rows.read(torch.arange(n))[0]
        x = self.images[:n] if self.images is not None else torch.stack([self.files_dataset[i] for i in range(n)])
        return to_model_range(x)

    def head_labels(self, n: int) -> torch.Tensor:
        return self.labels[:n]

    def check_labels(self, num_classes: int, setting: str = "model.num_classes") -> None:
        """A class-conditional run's data: every item has a class in 0..num_classes-1, or one line naming the
        `setting` that gave the class count (`ModelSpec.classes_setting`)."""
        given = f"{setting}={num_classes}" if setting == "model.num_classes" else f"{setting} ({num_classes} classes)"
        if self.labels is None or len(self.labels) == 0 or int(self.labels.min()) < 0:
            raise ConfigError(f"{given}: data.name={self.name} has no class labels "
                              "(an image folder needs one sub-folder per class)")
        top = int(self.labels.max())
        if top >= num_classes:
            fix = f"{setting}={top + 1}" if setting == "model.num_classes" else f"{setting} for {top + 1} classes"
            raise ConfigError(f"data.name={self.name} has class {top}, but {given}: set {fix}")

    def to(self, device: torch.device | str) -> "ImageData":
        if self.images is not None:
            self.images = self.images.to(device)
            if self.labels is not None:
                self.labels = self.labels.to(device)
        return self


# ---------------------------------------------------------------- the dataset registry
@dataclass(frozen=True)
class Dataset:
    """A dataset ebdiff can train on, by name (`data.name`). `load(dcfg, size, progress)` -> `ImageData` of
    uint8 images at `size` (dcfg: the `data` config section: root, split, limit, ...). `hflip`: data.hflip's
    default. `labelled`: train and test splits with class labels, so `--metric fd` scores on ebdiff's own
    classifier of it, named `FD-<fd_name>` (default: the name in capitals)."""

    name: str
    load: Callable[..., "ImageData"]
    hflip: bool = False
    labelled: bool = False
    fd_name: str = ""

    @property
    def fd_metric(self) -> str:
        return f"FD-{self.fd_name or self.name.upper()}"


DATASETS: dict[str, Dataset] = {}


def register_dataset(ds: Dataset) -> Dataset:
    DATASETS[ds.name] = ds
    return ds


def unregister_dataset(name: str) -> None:
    DATASETS.pop(name, None)


def dataset_names() -> tuple[str, ...]:
    return tuple(DATASETS)


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def _fashion_mnist(dcfg, size: int, progress: bool = True) -> "ImageData":
    x, y = load_fashion_mnist(dcfg.root, dcfg.split, size, dcfg.resize, download=dcfg.download)
    if dcfg.limit:
        x, y = x[: dcfg.limit], y[: dcfg.limit]
    return ImageData(x, y)


def _cifar10(dcfg, size: int, progress: bool = True) -> "ImageData":
    x, y = _load_cifar10(dcfg.root, dcfg.split, dcfg.cache_dir, dcfg.limit, progress, dcfg.bad_images)
    if x.shape[-1] != size:
        x = _fit(x, size, "resize")
    return ImageData(x, y)


register_dataset(Dataset("fashion-mnist", _fashion_mnist, hflip=False, labelled=True, fd_name="FMNIST"))
register_dataset(Dataset("cifar10", _cifar10, hflip=True, labelled=True))
register_dataset(Dataset("celeba", StreamedFolder(
    lambda base, d: [base / "celeba" / "img_align_celeba", base / "img_align_celeba", base], "celeba",
    lambda d: "download img_align_celeba from the CelebA site and unpack it under DIR"), hflip=True))
register_dataset(Dataset("lsun", StreamedFolder(
    lambda base, d: [base / f"{d.lsun_category}_{d.split}", base / d.lsun_category, base], "center",
    lambda d: f"export LSUN {d.lsun_category} to images (e.g. with the LSUN tools) under "
              f"DIR/{d.lsun_category}_{d.split}"), hflip=True))
register_dataset(Dataset("imagefolder", StreamedFolder(
    lambda base, d: [base / d.split, base], "center", lambda d: "DIR/<class>/*.jpg or DIR/*.jpg",
    class_folders=True), hflip=False))


def load_dataset(dcfg, size: int, progress: bool = True) -> ImageData:
    """The images of the dataset `dcfg.name` at `size`, with its flips (data.hflip, else its default)."""
    ds = get_dataset(dcfg.name)
    data = ds.load(dcfg, size, progress)
    data.name, data.hflip = dcfg.name, ds.hflip if dcfg.hflip is None else dcfg.hflip
    return data


# ---------------------------------------------------------------- data sources: what a backbone trains on
def pixel_training_data(dcfg, mcfg, device, progress: bool = True) -> ImageData:
    """A pixel backbone's training data: the dataset at its model's resolution (or data.image_size), which the
    model fits (`ModelSpec.fit`: a preset adapts to the data's channels and size, a model.config must match
    them); small datasets are moved to the GPU (no loader in the hot loop)."""
    spec = ModelSpec.of(mcfg)
    size = spec.image_shape()[1]
    multiple = spec.size_multiple()
    if dcfg.image_size is not None and dcfg.image_size % multiple:
        raise ConfigError(f"data.image_size={dcfg.image_size} does not fit {spec.label}: its size must be a "
                          f"multiple of {multiple} (a UNet halves it per down block, a DiT cuts it into patches)")
    if spec.preset is None and dcfg.image_size is not None:  # a model.config's size, checked before any loading
        spec.fit((spec.image_shape()[0], dcfg.image_size), f"data.image_size={dcfg.image_size}")
    data = load_dataset(dcfg, dcfg.image_size or size, progress=progress)
    spec.fit(data.shape, f"data.name={dcfg.name}")
    if data.images is not None and torch.device(device).type == "cuda":
        data.to(device)
    return data


# name -> fn(dcfg, mcfg, device, progress) -> ImageData; `latents` registers the latent source on import
SOURCES: dict[str, Callable[..., ImageData]] = {"pixels": pixel_training_data}


def register_source(name: str, fn: Callable[..., ImageData]) -> None:
    SOURCES[name] = fn


def source_of(mcfg) -> str:
    """The data source a model trains on (`mcfg`: the run's model config): `latents` (an autoencoder's latents)
    or `pixels`."""
    return "latents" if ModelSpec.of(mcfg).latent else "pixels"


def load_training_data(dcfg, mcfg, device: torch.device, progress: bool = True) -> ImageData:
    """The dataset a run trains on, from its model's data source (`SOURCES`): pixels at the model's resolution,
    or a latent backbone's latents of its autoencoder (`mcfg`: the run's model config)."""
    source = source_of(mcfg)
    if source not in SOURCES:
        raise ConfigError(f"{ModelSpec.of(mcfg).label} trains on {source}, a data source not loaded "
                          f"(import ebdiff.{source})")
    return SOURCES[source](dcfg, mcfg, device, progress)


def preflight_training_data(dcfg, mcfg, device) -> ImageData:
    """Load a run's training data once before its processes start: a source that prepares it (latents: the
    cache is encoded, on `device`, with progress) does so for all of them; pixels load on the CPU, quietly."""
    prepares = source_of(mcfg) != "pixels"
    return load_training_data(dcfg, mcfg, device if prepares else "cpu", progress=prepares)


# ---------------------------------------------------------------- deterministic batches
@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, batch: int, iteration: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Indices of this rank's batch at a global iteration: epochs are seeded permutations, drop-last."""
    per_epoch = n // (batch * world)
    if per_epoch == 0:
        raise DataError(f"dataset of {n} images is smaller than one global batch ({batch * world})")
    epoch, step = divmod(iteration, per_epoch)
    perm = _epoch_permutation(n, seed, epoch)
    start = (step * world + rank) * batch
    return perm[start: start + batch]


def iterations_per_epoch(n: int, batch: int, world: int = 1) -> int:
    return max(1, n // (batch * world))


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host -> device without stalling the GPU queue. A copy from pageable host memory may synchronise
    with the stream (CUDA "API synchronization behavior"), so the per-iteration draws of the hot loop
    (batch indices, flips, timesteps) go through pinned memory, whose copy is asynchronous."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


class BatchStream:
    """Yields float batches in [-1, 1] for iterations start, start+1, ...; flips with a per-iteration seed.
    labels=True: yields (batch, class labels) pairs."""

    def __init__(self, data: ImageData, batch: int, seed: int, device: torch.device, rank: int = 0,
                 world: int = 1, num_workers: int = 2, labels: bool = False):
        self.data, self.batch, self.seed, self.device = data, batch, seed, device
        self.rank, self.world, self.num_workers, self.labels = rank, world, num_workers, labels

    def _out(self, x: torch.Tensor, y: torch.Tensor | None):
        return (x, to_device(y, self.device)) if self.labels else x

    def _flip(self, x: torch.Tensor, iteration: int) -> torch.Tensor:
        if not self.data.hflip:
            return x
        g = torch.Generator().manual_seed(self.seed * 7_919 + iteration * 31 + self.rank)
        flip = to_device(torch.rand(x.shape[0], generator=g) < 0.5, x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __call__(self, start: int) -> Iterator[torch.Tensor]:
        n = len(self.data)
        it = start
        labels = self.data.labels
        if self.data.rows is not None:  # latents, read from the cache's shards per batch
            while True:
                idx = batch_indices(n, self.batch, it, self.seed, self.rank, self.world)
                x, y = self.data.rows.read(idx)
                yield self._out(to_device(x, self.device), y)
                it += 1
        if self.data.images is not None:
            while True:
                idx = batch_indices(n, self.batch, it, self.seed, self.rank, self.world)
                x = to_device(self.data.images[to_device(idx, self.data.images.device)], self.device)
                y = labels[to_device(idx, labels.device)] if self.labels else None
                yield self._out(self._flip(to_model_range(x), it), y)
                it += 1
        # streamed from files: a DataLoader over precomputed batches, resumed at `start`
        stream = self

        class _Batches(torch.utils.data.IterableDataset):
            def __iter__(self_inner):
                info = torch.utils.data.get_worker_info()
                wid, nw = (info.id, info.num_workers) if info else (0, 1)
                j = start + wid
                while True:
                    idx = batch_indices(n, stream.batch, j, stream.seed, stream.rank, stream.world)
                    yield torch.stack([stream.data.files_dataset[int(i)] for i in idx]), idx
                    j += nw

        loader = torch.utils.data.DataLoader(_Batches(), batch_size=None, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        while True:
            try:
                x, idx = next(batches)
            except DataError as exc:  # re-raised from a worker with its traceback: keep the one line
                raise DataError(str(exc).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
            y = labels[idx] if self.labels else None
            yield self._out(self._flip(to_model_range(x.to(self.device, non_blocking=True)), it), y)
            it += 1

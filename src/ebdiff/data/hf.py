"""Hugging Face datasets, offline: `data.name=hf` reads a dataset saved with `save_to_disk` (a `Dataset`
or a `DatasetDict`, whose split `data.split` is taken) or a local folder of parquet / arrow files
(`DIR/<split>/*.parquet`, `DIR/<split>*.parquet` or `DIR/*.parquet`), with `HF_DATASETS_OFFLINE=1`:
nothing is downloaded, a hub name without a local copy is one line.

`data.image_column` (an `Image` feature) holds the images and the optional `data.label_column` (a
`ClassLabel` or integer column) the classes, for conditioning and the FD classifier. Images are
centre-cropped and resized as image folders are; a dataset whose images are greyscale gives 1 channel,
else 3. A dataset whose decoded images fit in `IN_MEMORY_BYTES` is decoded once into memory; a larger
one stays memory-mapped by arrow and is decoded item by item (`HFImageDataset`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ..errors import DataError
from ..progress import progress_bar
from .datasets import Dataset, ImageData, decode_image, register_dataset

IN_MEMORY_BYTES = 1 << 30  # decoded uint8 images up to this size are held in memory
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def open_dataset(root: str | None, split: str):
    """The split of a local Hugging Face dataset (memory-mapped), or DataError in one line."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach the hub
    if not root:
        raise DataError("data.name=hf needs data.root=DIR: a dataset saved with save_to_disk, or a folder of "
                        "parquet/arrow files (nothing is downloaded)")
    import datasets  # import cost: only for data.name=hf

    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data.root={root} is not a local folder: data.name=hf reads a local copy only (nothing is "
                        "downloaded); save it first with datasets.load_dataset(NAME).save_to_disk(DIR)")
    if (base / "dataset_dict.json").is_file() or (base / "state.json").is_file():
        ds = datasets.load_from_disk(str(base))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{base} has no split '{split}' (it has: {', '.join(ds)}): set data.split")
            ds = ds[split]
        return ds
    for kind in ("parquet", "arrow"):
        files = (sorted((base / split).glob(f"*.{kind}")) or sorted(base.glob(f"{split}*.{kind}"))
                 or sorted(base.glob(f"*.{kind}")))
        if files:
            return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    raise DataError(f"{base} holds no saved dataset (dataset_dict.json / state.json) and no parquet or arrow files")


def _columns(ds, image_column: str, label_column: str | None) -> None:
    import datasets

    for col, what in ((image_column, "data.image_column"), (label_column, "data.label_column")):
        if col is not None and col not in ds.column_names:
            raise DataError(f"{what}={col}: the dataset has no such column (it has: {', '.join(ds.column_names)})")
    if not isinstance(ds.features[image_column], datasets.Image):
        raise DataError(f"data.image_column={image_column} is a {type(ds.features[image_column]).__name__} column, "
                        "not images: name the dataset's Image column")
    if label_column is not None:
        f = ds.features[label_column]
        if not (isinstance(f, datasets.ClassLabel) or (isinstance(f, datasets.Value) and "int" in f.dtype)):
            raise DataError(f"data.label_column={label_column} holds {f}, not class indices")


class HFImageDataset(torch.utils.data.Dataset):
    """Item i of a Hugging Face dataset's image column as uint8 [C, size, size], decoded on access."""

    def __init__(self, ds, column: str, size: int, grey: bool):
        import datasets

        self.ds = ds.cast_column(column, datasets.Image(decode=False)).select_columns([column])
        self.column, self.size, self.grey = column, size, grey

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        item = self.ds[int(i)][self.column]
        if not item or not item.get("bytes"):
            raise DataError(f"row {i} of the dataset holds no image bytes")
        try:
            x = decode_image(Image, io.BytesIO(item["bytes"]), self.size, "center")
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot decode the image of row {i} ({type(exc).__name__})") from None
        return torch.from_numpy(x[..., :1] if self.grey else x).permute(2, 0, 1).contiguous()


def load_hf(dcfg, size: int, progress: bool = True) -> ImageData:
    """data.name=hf as an `ImageData`: in memory when small, else streamed from arrow's memory map."""
    ds = open_dataset(dcfg.root, dcfg.split)
    _columns(ds, dcfg.image_column, dcfg.label_column)
    if dcfg.limit:
        ds = ds.select(range(min(dcfg.limit, len(ds))))
    if len(ds) == 0:
        raise DataError(f"the dataset under {dcfg.root} (split {dcfg.split}) is empty")
    grey = ds[0][dcfg.image_column].mode in GREY_MODES
    labels = None if dcfg.label_column is None else torch.tensor(ds[dcfg.label_column], dtype=torch.long)
    items = HFImageDataset(ds, dcfg.image_column, size, grey)
    if len(ds) * (1 if grey else 3) * size * size <= IN_MEMORY_BYTES:
        x = torch.stack([items[i] for i in progress_bar(range(len(items)), desc="decoding hf", disable=not progress)])
        return ImageData(x, labels)  # name and flips: load_dataset sets them, as for every dataset
    return ImageData(labels=labels, files_dataset=items)


# unlabelled for FD: ebdiff's own FD classifier needs a labelled train and test split of a known dataset
register_dataset(Dataset("hf", load_hf))

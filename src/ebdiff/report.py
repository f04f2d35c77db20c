"""Figures: Hamming-distance heatmaps (the paper's Figures 2 and 4) and sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_hamming(dm: np.ndarray, path: Path, mark: int | None = None, title: str = "",
                 iterations: list[int] | None = None) -> None:
    """Pairwise mask distances as a heatmap; `mark` outlines the check where the ticket was drawn."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4))
    n = dm.shape[0]
    im = ax.imshow(dm if n else np.zeros((1, 1)), cmap="viridis_r", vmin=0, vmax=max(float(dm.max()) if n else 1, 1e-6),
                   origin="upper", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="normalised Hamming distance")
    if mark is not None and n:
        ax.add_patch(plt.Rectangle((mark - 0.5, mark - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.axhline(mark, color="red", lw=0.6, ls="--")
        ax.axvline(mark, color="red", lw=0.6, ls="--")
    ax.set_xlabel("check")
    ax.set_ylabel("check")
    ax.set_title(title or "mask distance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_grid(images_u8: np.ndarray, path: Path, nrow: int | None = None) -> None:
    """NHWC uint8 images -> one PNG grid."""
    from PIL import Image

    n, h, w, c = images_u8.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    pad = 2
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images_u8[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)

"""Figures every stage draws: image grids (uint8 tiles, optionally labelled) written as PNG, and
matplotlib figures on the Agg backend. numpy, PIL and matplotlib only (each imported where used)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dkgm.errors import DKGMError


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    Image.fromarray(arr).save(path, format="PNG", optimize=True)


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 (N, C, H, W) images into one (rows*H', cols*W', C) uint8 array: `ncol` tiles per
    row, `pad` pixels of `pad_value` around and between tiles (torchvision's make_grid layout, in
    numpy: importing torchvision costs a stage about 2 s, more than drawing its figures)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DKGMError(f"image_grid expects uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    n, c, h, w = images.shape
    ncol = min(ncol or max(1, int(math.ceil(math.sqrt(n)))), max(n, 1))
    nrow = int(math.ceil(n / ncol)) if n else 0
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
    for i, tile in enumerate(images):
        y, x = divmod(i, ncol)
        top, left = y * (h + pad) + pad, x * (w + pad) + pad
        grid[top : top + h, left : left + w] = tile.transpose(1, 2, 0)
    return grid


TILE_TARGET = 56  # labelled grids scale each tile by the integer factor that brings it closest to this width (px)
LABEL_FONT_SIZE = 13


def labeled_grid(rows: list[np.ndarray], row_labels: list[str], col_labels: list[str] | None = None,
                 pad: int = 2) -> np.ndarray:
    """Rows of uint8 (N, C, H, W) images as one picture that names its own rows (left) and columns
    (top): tiles scaled up by an integer factor without smoothing, text drawn at that size, so the
    figure reads at its own size (the report shows it unscaled). Grey stays grey."""
    from PIL import Image, ImageDraw, ImageFont

    if len(rows) != len(row_labels):
        raise DKGMError(f"labeled_grid: {len(rows)} rows but {len(row_labels)} row labels")
    width = max(len(r) for r in rows)
    shape = rows[0].shape[1:]
    blank = np.full((1, *shape), 255, np.uint8)
    padded = [np.concatenate([r, *([blank] * (width - len(r)))]) if len(r) < width else r for r in rows]
    grid = image_grid(np.concatenate(padded), ncol=width, pad=pad)
    scale = max(1, round(TILE_TARGET / shape[-1]))
    mode = "L" if grid.shape[2] == 1 else "RGB"
    tiles = Image.fromarray(grid[:, :, 0] if mode == "L" else grid, mode)
    tiles = tiles.resize((tiles.width * scale, tiles.height * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    probe = ImageDraw.Draw(Image.new(mode, (1, 1)))

    def text_size(t: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), t, font=font)
        return right - left, bottom - top

    left = max(text_size(t)[0] for t in row_labels) + 10
    top = (max(text_size(t)[1] for t in col_labels) + 10) if col_labels else 0
    canvas = Image.new(mode, (left + tiles.width, top + tiles.height), 255)
    canvas.paste(tiles, (left, top))
    draw = ImageDraw.Draw(canvas)
    cell_h, cell_w = (shape[-2] + pad) * scale, (shape[-1] + pad) * scale
    ink = 0 if mode == "L" else (0, 0, 0)
    for i, label in enumerate(row_labels):
        draw.text((4, top + pad * scale + i * cell_h + (cell_h - pad * scale) / 2), label, fill=ink, font=font,
                  anchor="lm")
    for j, label in enumerate(col_labels or []):
        draw.text((left + pad * scale + j * cell_w + (cell_w - pad * scale) / 2, top / 2), label, fill=ink,
                  font=font, anchor="mm")
    out = np.asarray(canvas)
    return out[:, :, None] if mode == "L" else out


def new_figure(width: float = 6.0, height: float = 4.0, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), dpi=110)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)

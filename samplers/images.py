"""Images in and out of the core: tensors -> PIL, PNG bytes, plain and labelled grids."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL RGB images (rounded as torchvision's save_image does)."""
    arr = (images.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).numpy())) for a in arr]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    """Images of one size in rows of ``cols``, on white."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def comparison_grid(rows: Sequence[Sequence[Image.Image]], col_labels: Sequence[str],
                    row_labels: Sequence[str], min_cell: int = 160) -> Image.Image:
    """Images in a labelled grid: a column per mode, a row per class."""
    side = rows[0][0].width
    cell = max(side, min_cell)
    head, left, pad = 34, 120, 4
    grid = Image.new("RGB", (left + len(col_labels) * (cell + pad), head + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        for k, line in enumerate(label.split("\n")[:2]):
            draw.text((left + j * (cell + pad) + 4, 3 + 14 * k), line, fill="black")
    for i, row in enumerate(rows):
        y = head + i * (cell + pad)
        for k, line in enumerate(_wrap(row_labels[i], 18)[:4]):
            draw.text((4, y + 4 + 14 * k), line, fill="black")
        for j, img in enumerate(row):
            shown = img if img.width == cell else img.resize((cell, cell), Image.NEAREST)
            grid.paste(shown, (left + j * (cell + pad), y))
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines

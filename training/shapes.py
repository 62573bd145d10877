"""Shapes-1k: the procedural, class-conditional image dataset behind the embedded default model.

1000 classes = 10 shapes x 10 colours x 10 textures, so ImageNet-style ids (0..999, e.g. 207)
are valid and each class has a readable name ("red shaded triangle"). Class ``c`` is shape
``c // 100``, colour ``(c // 10) % 10``, texture ``c % 10``.

Every image is a pure function of (seed, index): the class is ``index % 1000`` (class-balanced)
and a generator seeded from (seed, index) draws the object's size, position and rotation, its
colour jitter, the pattern's offset and the background tone. The design keeps the class
visible after tokenization: one large object on a flat dark background, no clutter, and
textures drawn on the tokenizer's grid (one code per 4x4 pixels), so that stripes, checks and
dots are made of whole cells (the first version drew 3.4-4.6 px textures that an 8x8-code
tokenizer could not carry, which capped class accuracy of any sampler at 0.40; see
docs/eval/README.md). The variety that remains (pose, size, tones, pattern phase) is what a small
model's guidance-free samples get wrong more often than its guided ones, the gap CCA has to
close. Rendering is at 2x and box-filtered down, so edges are smooth.
"""

from __future__ import annotations

import math

import numpy as np
import torch

NUM_CLASSES = 1000
IMAGE_SIZE = 32

SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring", "heart", "crescent"]
COLOURS = {
    "red": (0.90, 0.12, 0.12), "orange": (1.00, 0.55, 0.08), "yellow": (0.95, 0.90, 0.15),
    "green": (0.15, 0.72, 0.22), "cyan": (0.10, 0.80, 0.85), "blue": (0.18, 0.32, 0.95),
    "purple": (0.58, 0.22, 0.85), "pink": (1.00, 0.50, 0.75), "brown": (0.55, 0.33, 0.12),
    "white": (0.96, 0.96, 0.96),
}
COLOUR_NAMES = list(COLOURS)
TEXTURES = ["plain", "h-striped", "v-striped", "diagonal-striped", "checkered", "dotted", "gridded",
            "shaded", "ringed", "speckled"]
ATTRIBUTES = ("shape", "colour", "texture")  # the order of ``class_attributes``
CELL = 4  # output pixels per tokenizer code (32 px / 8 codes): patterns are drawn on this grid


def class_attributes(class_id: int) -> tuple[int, int, int]:
    """class id -> (shape, colour, texture) indices."""
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class id must be in [0, {NUM_CLASSES - 1}], got {class_id}")
    return class_id // 100, (class_id // 10) % 10, class_id % 10


def class_name(class_id: int) -> str:
    shape, colour, texture = class_attributes(class_id)
    return f"{COLOUR_NAMES[colour]} {TEXTURES[texture]} {SHAPES[shape]}"


def class_names() -> list[str]:
    return [class_name(c) for c in range(NUM_CLASSES)]


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in the object's frame (unit radius, v pointing up)."""
    r = np.hypot(u, v)
    if shape == 0:
        return r <= 1.0
    if shape == 1:
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == 2:
        s3 = math.sqrt(3.0)
        return (v >= -0.55) & (s3 * u + v <= 1.0) & (-s3 * u + v <= 1.0)
    if shape == 3:
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == 4:
        theta = np.arctan2(u, v)
        tri = 1.0 - np.abs(((theta * 5.0 / (2 * math.pi)) % 1.0) * 2.0 - 1.0)
        return r <= 0.42 + 0.58 * tri
    if shape == 5:
        return ((np.abs(u) <= 0.34) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.34) & (np.abs(u) <= 0.95))
    if shape == 6:
        au, av = np.abs(u), np.abs(v)
        return (av <= 0.87) & (0.5 * av + 0.87 * au <= 0.87)
    if shape == 7:
        return (r <= 1.0) & (r >= 0.5)
    if shape == 8:
        x, y = u * 1.15, v * 1.15 + 0.15
        return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
    return (r <= 1.0) & (np.hypot(u - 0.5, v - 0.15) > 0.78)


def _texture(texture: int, col: np.ndarray, row: np.ndarray, v: np.ndarray, r: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    """Where the darker tone goes (0/1, or a ramp for "shaded"), per supersampled pixel.

    ``col``/``row`` index the tokenizer's 4x4-pixel cells (shifted by a random whole number of
    cells), so every regular pattern is made of whole cells: one code can carry it. ``v`` and
    ``r`` are the object's frame (for the shading ramp and the rings)."""
    if texture == 0:
        return np.zeros(col.shape, np.float32)
    if texture == 1:
        return (row % 2 == 0).astype(np.float32)
    if texture == 2:
        return (col % 2 == 0).astype(np.float32)
    if texture == 3:
        return ((col + row) % 3 == 0).astype(np.float32)
    if texture == 4:
        return ((col + row) % 2 == 0).astype(np.float32)
    if texture == 5:
        return ((col % 2 == 0) & (row % 2 == 0)).astype(np.float32)
    if texture == 6:
        return ((col % 2 == 0) | (row % 2 == 0)).astype(np.float32)
    if texture == 7:
        return np.clip((1.0 - v) / 2.0, 0.0, 1.0).astype(np.float32)  # light on top, dark at the bottom
    if texture == 8:
        return ((r * 3.0) % 2.0 < 1.0).astype(np.float32)
    cells = rng.random((int(row.max()) + 1, int(col.max()) + 1)) < 0.5
    return cells[row, col].astype(np.float32)


def render(class_id: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image of ``class_id`` as float32 [size, size, 3] in [0, 1]."""
    shape, colour, texture = class_attributes(class_id)
    ss = 2 * size
    y, x = np.mgrid[0:ss, 0:ss].astype(np.float32) + 0.5

    # background: a dark, nearly neutral flat tone
    base = rng.uniform(0.05, 0.25)
    img = np.empty((ss, ss, 3), np.float32)
    img[:] = np.clip(base + rng.normal(0.0, 0.02, size=3), 0.0, 1.0)

    # the object: large, near the centre, a little rotated
    radius = rng.uniform(0.36, 0.45) * ss
    cx = ss / 2 + rng.uniform(-0.09, 0.09) * ss
    cy = ss / 2 + rng.uniform(-0.09, 0.09) * ss
    rot = rng.uniform(-0.25, 0.25)
    dx, dy = (x - cx) / radius, (cy - y) / radius  # v points up
    u = dx * math.cos(rot) - dy * math.sin(rot)
    v = dx * math.sin(rot) + dy * math.cos(rot)
    mask = _shape_mask(shape, u, v)
    rgb = np.asarray(COLOURS[COLOUR_NAMES[colour]], dtype=np.float32)
    rgb = np.clip(rgb * rng.uniform(0.92, 1.05) + rng.normal(0.0, 0.02, size=3), 0.0, 1.0)
    dark = rgb * 0.4
    cell_ss = 2 * CELL
    col = ((x // cell_ss).astype(np.int64) + rng.integers(0, 2))
    row = ((y // cell_ss).astype(np.int64) + rng.integers(0, 2))
    t = _texture(texture, col, row, v, np.hypot(u, v), rng)[..., None]
    obj = rgb * (1.0 - t) + dark * t
    img = np.where(mask[..., None], obj, img)

    # 2x box filter down to the output size
    return img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3)).astype(np.float32)


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


class ShapesDataset(torch.utils.data.Dataset):
    """Deterministic, class-balanced Shapes-1k: item ``i`` is (image [3, H, W] in [-1, 1], class i % 1000)."""

    def __init__(self, length: int, seed: int = 0, size: int = IMAGE_SIZE):
        if length < 1:
            raise ValueError("length must be at least 1")
        self.length, self.seed, self.size = int(length), int(seed), int(size)

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        return index % NUM_CLASSES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        label = self.label(index)
        img = render(label, _rng(self.seed, index), self.size)
        return torch.from_numpy(img).permute(2, 0, 1) * 2.0 - 1.0, label


def make_batch(seed: int, indices: range | list[int], size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, H, W] in [-1, 1] and labels [N] for the given dataset indices."""
    ds = ShapesDataset(max(indices) + 1, seed, size)  # items are computed on demand, nothing is stored
    items = [ds[i] for i in indices]
    return torch.stack([im for im, _ in items]), torch.tensor([lb for _, lb in items])

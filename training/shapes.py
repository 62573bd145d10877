"""Shapes-1k: the procedural, class-conditional image dataset behind the embedded default model.

1000 classes = 10 shapes x 10 colours x 10 textures, so ImageNet-style ids (0..999, e.g. 207)
are valid and each class has a readable name ("red ringed triangle"). Class ``c`` is shape
``c // 100``, colour ``(c // 10) % 10``, texture ``c % 10``.

Every image is a pure function of (seed, index): the class is ``index % 1000`` (class-balanced)
and a generator seeded from (seed, index) draws position, size, rotation, colour jitter, texture
phase and frequency, a tinted gradient background and a few distractor blobs. The intra-class
variety and clutter are what make a small model's guidance-free samples worse than its guided
ones, the gap CCA has to close. Rendering is at 2x and box-filtered down, so edges are smooth.
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
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95))
    if shape == 6:
        au, av = np.abs(u), np.abs(v)
        return (av <= 0.87) & (0.5 * av + 0.87 * au <= 0.87)
    if shape == 7:
        return (r <= 1.0) & (r >= 0.55)
    if shape == 8:
        x, y = u * 1.15, v * 1.15 + 0.15
        return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
    return (r <= 1.0) & (np.hypot(u - 0.5, v - 0.15) > 0.78)


def _texture(texture: int, x: np.ndarray, y: np.ndarray, r_px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture value in [0, 1] per (supersampled) pixel; 1 = the darker tone."""
    period = rng.uniform(3.4, 4.6) * 2  # in supersampled pixels
    phase = rng.uniform(0, period)
    angle = rng.uniform(-0.25, 0.25)
    xr = x * math.cos(angle) - y * math.sin(angle)
    yr = x * math.sin(angle) + y * math.cos(angle)
    if texture == 0:
        return np.zeros_like(x)
    if texture == 1:
        return (((yr + phase) / period) % 1.0 < 0.5).astype(np.float32)
    if texture == 2:
        return (((xr + phase) / period) % 1.0 < 0.5).astype(np.float32)
    if texture == 3:
        return (((xr + yr + phase) / (period * 1.2)) % 1.0 < 0.5).astype(np.float32)
    if texture == 4:
        a = ((xr + phase) / period) % 1.0 < 0.5
        b = ((yr + phase) / period) % 1.0 < 0.5
        return (a ^ b).astype(np.float32)
    if texture in (5, 6):
        cell = period * 1.5
        fx = ((xr + phase) / cell) % 1.0 - 0.5
        fy = ((yr + phase) / cell) % 1.0 - 0.5
        if texture == 5:
            return (np.hypot(fx, fy) < 0.27).astype(np.float32)
        return ((np.abs(fx) > 0.36) | (np.abs(fy) > 0.36)).astype(np.float32)
    if texture == 7:
        return np.clip(r_px, 0.0, 1.0) ** 1.5
    if texture == 8:
        return (((r_px * 10.0 + phase / period) % 2.0) < 1.0).astype(np.float32)
    coarse = rng.random((x.shape[0] // 4 + 1, x.shape[1] // 4 + 1)) < 0.5
    return np.kron(coarse, np.ones((4, 4)))[: x.shape[0], : x.shape[1]].astype(np.float32)


def render(class_id: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image of ``class_id`` as float32 [size, size, 3] in [0, 1]."""
    shape, colour, texture = class_attributes(class_id)
    ss = 2 * size
    y, x = np.mgrid[0:ss, 0:ss].astype(np.float32) + 0.5

    # background: a tinted, low-saturation linear gradient
    base = rng.uniform(0.08, 0.42)
    tint = rng.normal(0.0, 0.05, size=3)
    gdir = rng.uniform(0, 2 * math.pi)
    grad = ((x * math.cos(gdir) + y * math.sin(gdir)) / ss) * rng.uniform(-0.2, 0.2)
    img = np.clip(base + tint[None, None, :] + grad[..., None], 0.0, 1.0).astype(np.float32)

    # clutter: small blobs in muted colours
    for _ in range(rng.integers(0, 4)):
        cx, cy = rng.uniform(0, ss, size=2)
        rad = rng.uniform(2.0, 5.0) * 2
        blob_colour = np.clip(base + rng.normal(0.0, 0.18, size=3), 0.0, 1.0)
        if rng.random() < 0.5:
            m = np.hypot(x - cx, y - cy) <= rad
        else:
            m = (np.abs(x - cx) <= rad) & (np.abs(y - cy) <= rad * 0.6)
        img[m] = blob_colour

    # the object
    radius = rng.uniform(0.30, 0.42) * ss
    cx = ss / 2 + rng.uniform(-0.12, 0.12) * ss
    cy = ss / 2 + rng.uniform(-0.12, 0.12) * ss
    rot = rng.uniform(-0.35, 0.35)
    dx, dy = (x - cx) / radius, (cy - y) / radius  # v points up
    u = dx * math.cos(rot) - dy * math.sin(rot)
    v = dx * math.sin(rot) + dy * math.cos(rot)
    mask = _shape_mask(shape, u, v)
    rgb = np.asarray(COLOURS[COLOUR_NAMES[colour]], dtype=np.float32)
    rgb = np.clip(rgb * rng.uniform(0.85, 1.1) + rng.normal(0.0, 0.04, size=3), 0.0, 1.0)
    dark = rgb * 0.35
    t = _texture(texture, x - cx, y - cy, np.hypot(u, v), rng)[..., None]
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

"""Datasets for the trainer: built-in digits (no download), 2-D toys for tests, and user arrays / image folders.

Every dataset comes as fixed train/val/test splits of float32 tensors scaled to [-1, 1] (user arrays are
taken as they are). The val split is what stage 1's outer loss is measured on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

BUILTIN_DATASETS = ("digits", "digits-image", "moons", "gaussians")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_FRACTIONS = (0.7, 0.15)  # train, val; the rest is test


@dataclass
class DataSplits:
    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    data_shape: tuple[int, ...]
    labels: dict[str, torch.Tensor] = field(default_factory=dict)


def _split(name: str, x: np.ndarray, y: np.ndarray | None, seed: int) -> DataSplits:
    n = len(x)
    if n < 3:
        raise ValueError(f"dataset {name!r} has {n} items; need at least 3 for train/val/test")
    order = np.random.default_rng(seed).permutation(n)
    n_train = max(1, int(round(SPLIT_FRACTIONS[0] * n)))
    n_val = max(1, int(round(SPLIT_FRACTIONS[1] * n)))
    n_train = min(n_train, n - 2)
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    if len(parts["test"]) == 0:
        parts["val"], parts["test"] = parts["val"][:-1], parts["val"][-1:]
    tensors = {k: torch.from_numpy(np.ascontiguousarray(x[idx], dtype=np.float32)) for k, idx in parts.items()}
    labels = {k: torch.from_numpy(y[idx].astype(np.int64)) for k, idx in parts.items()} if y is not None else {}
    return DataSplits(name, tensors["train"], tensors["val"], tensors["test"], tuple(x.shape[1:]), labels)


def _digits(image: bool) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0 * 2.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return x, bunch.target


def _moons(n: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n, noise=0.05, random_state=0)
    x = (x - x.mean(0)) / x.std(0)
    return x.astype(np.float32), y


def _gaussians(n: int = 3000, modes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, modes, n)
    angles = 2 * math.pi * y / modes
    centers = np.stack([np.cos(angles), np.sin(angles)], 1) * 1.5
    return (centers + 0.1 * rng.standard_normal((n, 2))).astype(np.float32), y


def _load_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.keys())
        if not keys:
            raise ValueError(f"{path}: empty .npz archive")
        key = next((k for k in ("x", "data", "images", "arr_0") if k in keys), keys[0])
        y = next((archive[k] for k in ("y", "labels", "targets") if k in keys), None)
        return archive[key], y


def _load_image_folder(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        raise ValueError("reading an image folder needs Pillow (pip install pillow)") from None
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    arrays = []
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("L" if im.mode in ("1", "L", "P", "I", "F") else "RGB"), dtype=np.float32)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"{f}: shape {a.shape} differs from {arrays[0].shape}; images must share one size")
        arrays.append(a)
    return np.stack(arrays) / 255.0 * 2.0 - 1.0


def load_dataset(name_or_path: str, seed: int = 0) -> DataSplits:
    """A built-in dataset by name, or user data from a .npy/.npz file or an image folder."""
    if name_or_path in ("digits", "digits-image"):
        x, y = _digits(image=name_or_path == "digits-image")
        return _split(name_or_path, x, y, seed)
    if name_or_path == "moons":
        return _split("moons", *_moons(), seed)
    if name_or_path == "gaussians":
        return _split("gaussians", *_gaussians(), seed)
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"dataset {name_or_path!r} is neither built in ({', '.join(BUILTIN_DATASETS)}) "
                         "nor an existing .npy/.npz file or image folder")
    if path.is_dir():
        x, y = _load_image_folder(path), None
    elif path.suffix in (".npy", ".npz"):
        x, y = _load_array_file(path)
    else:
        raise ValueError(f"{path}: unsupported file type (use .npy, .npz or a folder of images)")
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.ndim < 2:
        raise ValueError(f"{path}: need a numeric array [N, ...] with N items, got dtype {x.dtype} shape {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: contains NaN or Inf")
    if y is not None and len(y) != len(x):
        y = None
    return _split(path.stem, x, y, seed)

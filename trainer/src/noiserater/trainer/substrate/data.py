"""Datasets for the trainer: built-in digits (no download), 2-D toys for tests, and user arrays / image folders.

Every dataset comes as fixed train/val/test splits of float32 tensors. The val split is what stage 1's outer
loss is measured on. Built-in data and image folders are scaled to [-1, 1]. User arrays (.npy, or one array
of an .npz chosen by `key`) are checked and normalised, each step said in one log line:

- values (`value_range`): "auto" scales uint8 arrays from [0, 255] to [-1, 1], takes float arrays and integer
  arrays within [-1, 1] as they are, and refuses other integer arrays (their range is not known); "LOW:HIGH"
  maps [LOW, HIGH] linearly to [-1, 1] for any dtype; "none" takes the values as they are.
- layout (`layout`, arrays of rank 4): "auto" reads (N, H, W, C) with C in 1..4, and H and W not, as
  channel-last and transposes it to (N, C, H, W), the layout the image denoisers and raters use; "nchw" and
  "nhwc" say which it is.

`warn_if_tiny` warns when there are fewer training items than a batch.
"""

from __future__ import annotations

import logging
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

BUILTIN_DATASETS = ("digits", "digits-image", "moons", "gaussians")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_FRACTIONS = (0.7, 0.15)  # train, val; the rest is test
DATA_KEYS = ("x", "data", "images", "arr_0")  # an .npz's data array, when `key` names none
LABEL_KEYS = ("y", "labels", "targets")
LAYOUTS = ("auto", "nchw", "nhwc")
NPY_MAGIC = b"\x93NUMPY"

log = logging.getLogger("noiserater.trainer.data")


class DataError(ValueError):
    """Data that cannot be used as it is; the message is one line and starts with the file."""


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


def _check_magic(path: Path) -> None:
    """One clear line for a file that is not what its suffix says (numpy would advise unpickling it)."""
    with path.open("rb") as fh:
        head = fh.read(len(NPY_MAGIC))
    if path.suffix == ".npy" and head != NPY_MAGIC:
        raise ValueError(f"{path}: not a NumPy .npy file (a text or pickle file?); write arrays with numpy.save")
    if path.suffix == ".npz" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a NumPy .npz archive; write arrays with numpy.savez")


def _load_array_file(path: Path, key: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    _check_magic(path)
    try:
        if path.suffix == ".npy":
            if key:
                raise DataError(f"{path}: --key {key} names an array of an .npz archive; a .npy file holds one")
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if not keys:
                raise DataError(f"{path}: empty .npz archive")
            if key:
                if key not in keys:
                    raise DataError(f"{path}: no array {key!r} (arrays: {', '.join(keys)})")
                chosen = key
            else:
                data_keys = [k for k in keys if k not in LABEL_KEYS]
                named = [k for k in DATA_KEYS if k in keys]
                if len(data_keys) == 1:
                    chosen = data_keys[0]
                elif len(named) == 1:
                    chosen = named[0]
                else:
                    raise DataError(f"{path}: holds arrays {', '.join(keys)}; choose the data with --key NAME")
            y = next((archive[k] for k in LABEL_KEYS if k in keys and k != chosen), None)
            return archive[chosen], y
    except DataError:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:  # truncated or damaged files
        if "pickle" in str(exc):  # an object array: numpy's message advises allow_pickle=True
            raise DataError(f"{path}: holds Python objects, not a numeric array; save a numeric array") from None
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot read it ({first})") from None


def _parse_range(value_range: str) -> tuple[float, float] | None:
    try:
        low, high = (float(v) for v in value_range.split(":"))
    except ValueError:
        raise ValueError(f"--data-range: {value_range!r} is not auto, none or LOW:HIGH (e.g. 0:255)") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"--data-range: {value_range!r} needs finite LOW < HIGH")
    return low, high


def normalise_values(x: np.ndarray, name: str, value_range: str = "auto") -> np.ndarray:
    """float32 values, scaled to [-1, 1] as `value_range` says (see the module docstring)."""
    if value_range == "none":
        return x.astype(np.float32)
    if value_range != "auto":
        low, high = _parse_range(value_range)
    elif x.dtype == np.uint8:
        low, high = 0.0, 255.0
    else:
        if x.dtype.kind in "iu" and x.size and (x.min() < -1 or x.max() > 1):
            hint = "0:255" if x.min() >= 0 and x.max() <= 255 else f"{x.min()}:{x.max()}"
            raise ValueError(f"{name}: {x.dtype} values in [{x.min()}, {x.max()}], an unknown range: pass "
                             f"--data-range LOW:HIGH to scale it to [-1, 1] (e.g. {hint}) or --data-range none")
        return x.astype(np.float32)
    log.info("%s: %s values scaled from [%g, %g] to [-1, 1]", name, x.dtype, low, high)
    return ((x.astype(np.float64) - low) / (high - low) * 2.0 - 1.0).astype(np.float32)


def normalise_layout(x: np.ndarray, name: str, layout: str = "auto") -> np.ndarray:
    """Images as (N, C, H, W): channel-last arrays transposed (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
    if x.ndim != 4:
        if layout != "auto":
            raise ValueError(f"{name}: --layout {layout} needs an image array (N, C, H, W) or (N, H, W, C), "
                             f"got shape {list(x.shape)}")
        return x
    channels_first, channels_last = 1 <= x.shape[1] <= 4, 1 <= x.shape[3] <= 4
    if layout == "auto" and channels_last and channels_first:
        log.info("%s: shape %s read as (N, C, H, W); pass --layout nhwc if the channels are last", name,
                 list(x.shape))
    if layout == "nhwc" or (layout == "auto" and channels_last and not channels_first):
        out = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        log.info("%s: channel-last (N, H, W, C) %s transposed to (N, C, H, W) %s", name, list(x.shape),
                 list(out.shape))
        return out
    return x


def warn_if_tiny(data: DataSplits, batch_size: int) -> bool:
    """Log a warning (and return True) when the training split has fewer items than a batch."""
    if len(data.train) >= batch_size:
        return False
    log.warning("dataset %s: %d training items (of %d), fewer than a batch of %d: every batch repeats items",
                data.name, len(data.train), len(data.train) + len(data.val) + len(data.test), batch_size)
    return True


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


def load_dataset(name_or_path: str, seed: int = 0, *, key: str | None = None, value_range: str = "auto",
                 layout: str = "auto") -> DataSplits:
    """A built-in dataset by name, or user data from a .npy/.npz file or an image folder. `key` names the
    array of an .npz; `value_range` and `layout` say how a user array is normalised (module docstring)."""
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
        x, y = _load_array_file(path, key)
    else:
        raise ValueError(f"{path}: unsupported file type (use .npy, .npz or a folder of images)")
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.ndim < 2:
        raise ValueError(f"{path}: need a numeric array [N, ...] with N items, got dtype {x.dtype} shape {x.shape}")
    if not path.is_dir():
        x = normalise_layout(normalise_values(x, path.name, value_range), path.name, layout)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: contains NaN or Inf")
    if y is not None and len(y) != len(x):
        y = None
    return _split(path.stem, x, y, seed)

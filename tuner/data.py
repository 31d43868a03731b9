"""Datasets behind one spec string, cached on the training device, with batched augmentation.

Specs: `cifar10` (torchvision download into a data dir), a path to an `.npz` file
(`x_train`, `y_train`, `x_test`, `y_test`; uint8 N×32×32×3), or `synthetic` (procedural,
ships as code; `synthetic:N` sets the training-set size).

Each dataset is loaded once per process into uint8 tensors on the device. Augmentation (random
crop with zero padding 4, horizontal flip) is one gather per epoch over a cached padded-and-
mirrored copy of the training images, never per image, with no host sync; there are no
DataLoader workers in the training loop.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SYNTHETIC_CLASSES = tuple(f"{p}-{f}" for f in ("low", "high")
                          for p in ("hstripes", "vstripes", "checker", "rings", "hatch"))
SPLIT_SEED = 0  # the validation split is the same for every trial of a sweep, whatever its seed


@dataclass(frozen=True)
class RawDataset:
    """Host arrays, uint8 N×32×32×3 images and int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


@dataclass(frozen=True)
class DeviceData:
    """One dataset on the training device: uint8 N×3×32×32 images, int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: torch.Tensor  # 1×3×1×1, in 0..255 pixel units, from the training split
    std: torch.Tensor
    classes: tuple[str, ...]

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

def default_data_dir() -> Path:
    """`TUNER_DATA_DIR`, else the per-user cache dir (~/.cache/tuner/data); see settings.py."""
    from .settings import data_dir

    return data_dir(None).expanduser()


def load_raw(spec: str, data_dir: str | Path | None = None) -> RawDataset:
    """Resolve a dataset spec to host arrays."""
    if spec == "cifar10":
        return load_cifar10(Path(data_dir) if data_dir else default_data_dir())
    if spec == "synthetic" or spec.startswith("synthetic:"):
        size = 4000
        if ":" in spec:
            try:
                size = int(spec.split(":", 1)[1])
            except ValueError:
                size = -1
            if size < 100:
                raise DataError(f"dataset {spec!r}: synthetic size must be a whole number >= 100", exit_code=2)
        return make_synthetic(n_train=size)
    if spec.endswith(".npz") or os.sep in spec or Path(spec).exists():
        return load_npz(Path(spec))
    raise DataError(f"dataset {spec!r}: unknown spec (valid: cifar10, synthetic, synthetic:N, a path to an .npz file)",
                    exit_code=2)


def load_cifar10(data_dir: Path, *, download: bool = True) -> RawDataset:
    """CIFAR-10 through torchvision, downloaded (checksum-verified, with a progress bar) if absent."""
    from torchvision.datasets import CIFAR10

    def open_split(train: bool, fetch: bool) -> CIFAR10:
        return CIFAR10(root=str(data_dir), train=train, download=fetch)

    try:
        train, test = open_split(True, False), open_split(False, False)
    except RuntimeError:
        if not download:
            raise DataError(_cifar_missing(data_dir, "download disabled")) from None
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            train, test = open_split(True, True), open_split(False, False)
        except Exception as exc:  # URLError, OSError, checksum RuntimeError: all mean "not available"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(_cifar_missing(data_dir, reason)) from None
    return RawDataset(
        name="cifar10",
        x_train=np.asarray(train.data, dtype=np.uint8),
        y_train=np.asarray(train.targets, dtype=np.int64),
        x_test=np.asarray(test.data, dtype=np.uint8),
        y_test=np.asarray(test.targets, dtype=np.int64),
        classes=tuple(train.classes),
    )


def _cifar_missing(data_dir: Path, reason: str) -> str:
    return (f"CIFAR-10 is not in {data_dir} and could not be downloaded ({reason}); "
            f"put the extracted 'cifar-10-batches-py' folder in {data_dir} or pass --data-dir")


def load_npz(path: Path) -> RawDataset:
    """An `.npz` with x_train, y_train, x_test, y_test (uint8 N×32×32×3, integer labels 0..9)."""
    if not path.is_file():
        raise DataError(f"dataset {path}: file not found", exit_code=2)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a single .npy array under an .npz name
            raise DataError(f"dataset {path}: not an .npz archive (it holds a single array)", exit_code=2)
        with loaded as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in npz.files}
            names = npz["label_names"] if "label_names" in npz.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"dataset {path}: not a readable .npz file ({exc})", exit_code=2) from None
    for key in ("x_train", "y_train", "x_test", "y_test"):
        if key not in arrays:
            raise DataError(f"dataset {path}: missing array {key!r}", exit_code=2)
    for key in ("x_train", "x_test"):
        x = arrays[key]
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DataError(f"dataset {path}: {key} must have shape (N, 32, 32, 3), got {x.shape}", exit_code=2)
        if x.dtype != np.uint8:
            raise DataError(f"dataset {path}: {key} must be uint8, got {x.dtype}", exit_code=2)
    for key, xkey in (("y_train", "x_train"), ("y_test", "x_test")):
        y = arrays[key]
        if y.ndim != 1 or len(y) != len(arrays[xkey]) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"dataset {path}: {key} must be {len(arrays[xkey])} integer labels, "
                            f"got shape {y.shape} of {y.dtype}", exit_code=2)
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise DataError(f"dataset {path}: {key} labels must be in 0..9", exit_code=2)
    if len(arrays["y_train"]) < 20:
        raise DataError(f"dataset {path}: x_train has too few images ({len(arrays['y_train'])})", exit_code=2)
    classes = tuple(str(n) for n in names) if names is not None and len(names) == 10 else CIFAR10_CLASSES
    return RawDataset(name=path.name, x_train=arrays["x_train"], y_train=arrays["y_train"].astype(np.int64),
                      x_test=arrays["x_test"], y_test=arrays["y_test"].astype(np.int64), classes=classes)


def make_synthetic(n_train: int = 4000, n_test: int = 1000, seed: int = 1234) -> RawDataset:
    """A deterministic 10-class dataset of noisy textures (no files, no download).

    A class is a (pattern, frequency) pair: horizontal stripes, vertical stripes, a checkerboard,
    rings around a random centre, or a diagonal cross-hatch, each at a low or a high spatial
    frequency. Every pattern is symmetric under a horizontal flip, so augmentation keeps labels.
    Colour, phase, contrast, a distracting blob and pixel noise are random and carry no label
    information: a CNN learns it well in a couple of epochs with a sensible learning rate, not
    with a tiny one, and is unstable with a huge one.
    """
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    pattern = labels % 5
    freq = torch.where(labels < 5, 0.5, 1.2) * (1 + (torch.rand(n, generator=g) - 0.5) * 0.3)
    ph1, ph2 = torch.rand(2, n, generator=g) * 2 * math.pi
    coords = torch.arange(32).float() - 15.5
    yy, xx = (c[None] for c in torch.meshgrid(coords, coords, indexing="ij"))
    f, p1, p2 = freq[:, None, None], ph1[:, None, None], ph2[:, None, None]
    centre = (torch.rand(2, n, 1, 1, generator=g) - 0.5) * 24
    patterns = (
        lambda f, p1, p2, c: torch.sin(f * yy + p1),  # horizontal stripes
        lambda f, p1, p2, c: torch.sin(f * xx + p1),  # vertical stripes
        lambda f, p1, p2, c: torch.sin(f * xx + p1) * torch.sin(f * yy + p2) * 1.6,  # checkerboard
        lambda f, p1, p2, c: torch.sin(f * torch.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2) + p1),  # rings
        lambda f, p1, p2, c: (torch.sin(f * (xx + yy) / 1.414 + p1)
                              + torch.sin(f * (xx - yy) / 1.414 + p2)) / 1.6,  # cross-hatch
    )
    wave = torch.empty(n, 32, 32)
    for k, draw in enumerate(patterns):  # each image's own pattern only
        i = (pattern == k).nonzero().squeeze(1)
        wave[i] = draw(f[i], p1[i], p2[i], centre[:, i])
    wave = wave.clamp(-1, 1)  # n×32×32
    contrast = 0.5 + 0.5 * torch.rand(n, generator=g)
    color_a, color_r = torch.rand(2, n, 3, 1, 1, generator=g)
    color_b = 0.7 * (1 - color_a) + 0.3 * color_r  # far enough from color_a for the pattern to show
    mix = ((wave * contrast[:, None, None] + 1) / 2)[:, None]  # n×1×32×32 in [0, 1]
    img = color_a * mix + color_b * (1 - mix)
    blob_c = torch.rand(2, n, 1, 1, generator=g) * 32 - 15.5
    radius = 3 + 5 * torch.rand(n, 1, 1, generator=g)
    blob = ((xx - blob_c[0]) ** 2 + (yy - blob_c[1]) ** 2) < radius ** 2
    img = torch.where(blob[:, None], torch.rand(n, 3, 1, 1, generator=g), img)
    img = img + 0.12 * torch.randn(img.shape, generator=g)
    pixels = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    y = labels.numpy().astype(np.int64)
    return RawDataset(name="synthetic", x_train=pixels[:n_train], y_train=y[:n_train], x_test=pixels[n_train:],
                      y_test=y[n_train:], classes=SYNTHETIC_CLASSES)


# ---------------------------------------------------------------------------------------------
# Device cache
# ---------------------------------------------------------------------------------------------

_CACHE: dict[tuple, DeviceData] = {}


def to_device(raw: RawDataset, device: torch.device, val_fraction: float = 0.1) -> DeviceData:
    """Split off a seeded validation set and stage everything as uint8 NCHW on `device`."""
    n = len(raw.y_train)
    n_val = max(1, int(round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, train_idx = perm[:n_val], perm[n_val:]

    def nchw(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()

    x_all, y_all = nchw(raw.x_train), torch.from_numpy(raw.y_train)
    x_train = x_all[train_idx]
    mean = x_train.float().mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.float().std(dim=(0, 2, 3), keepdim=True).clamp_min(1.0)
    put = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return DeviceData(
        name=raw.name, x_train=put(x_train), y_train=put(y_all[train_idx]),
        x_val=put(x_all[val_idx]), y_val=put(y_all[val_idx]),
        x_test=put(nchw(raw.x_test)), y_test=put(torch.from_numpy(raw.y_test)),
        mean=put(mean), std=put(std), classes=raw.classes,
    )


def load_dataset(spec: str, device: torch.device | str = "cpu", *, data_dir: str | Path | None = None,
                 val_fraction: float = 0.1) -> DeviceData:
    """The dataset for `spec` on `device`, loaded once per process and reused across trials."""
    device = torch.device(device)
    where = str(Path(spec).resolve()) if spec.endswith(".npz") else spec
    key = (where, str(data_dir or default_data_dir()) if spec == "cifar10" else None, str(device), val_fraction)
    if key not in _CACHE:
        _CACHE[key] = to_device(load_raw(spec, data_dir), device, val_fraction)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()
    _SOURCES.clear()


# ---------------------------------------------------------------------------------------------
# Batched augmentation and batching
# ---------------------------------------------------------------------------------------------

def crop_source(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """uint8 N×C×H×W → the contiguous, zero-padded N×(H+2p)×(W+2p)×C images followed by their
    left-right mirrors (2N images): what `augment` crops from. Made once per dataset."""
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    return torch.cat([padded, padded.flip(2)]).contiguous()


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4, index: torch.Tensor | None = None,
            source: torch.Tensor | None = None) -> torch.Tensor:
    """Random crop with zero padding `pad` and random horizontal flip, for a whole N×C×H×W batch.

    One gather and no host sync: the crop windows of `source` (`crop_source(x, pad)`, which holds
    each padded image and its mirror) are an `unfold`ed view, and image i is the window
    (image, dy, dx) of that view, with image `index[i]` or its mirror `index[i] + N`. A flipped
    crop at dx is the mirror's crop at 2·pad − dx, and dx is uniform, so reading the mirror at dx
    draws the same distribution. About 8 tensor ops per epoch, whatever N is. With `index`,
    augments `x[index]` (the shuffle is part of the gather). The result is a channels_last
    N×C×H×W view (what `normalize` and the models want).
    """
    n = x.shape[0] if index is None else len(index)
    total, c, h, w = x.shape
    dev = x.device
    src = crop_source(x, pad) if source is None else source
    span = 2 * pad + 1
    gdev = generator.device
    dy = torch.randint(0, span, (n,), generator=generator, device=gdev).to(dev)
    dx = torch.randint(0, span, (n,), generator=generator, device=gdev).to(dev)
    mirror = torch.randint(0, 2, (n,), generator=generator, device=gdev).to(dev)
    image = mirror.mul_(total).add_(torch.arange(n, device=dev) if index is None else index)
    windows = src.unfold(1, h, 1).unfold(2, w, 1).permute(0, 1, 2, 4, 5, 3)  # 2N×span×span×H×W×C view
    return windows[image, dy, dx].permute(0, 3, 1, 2)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W → float, standardised, channels_last (what the models want). One float
    buffer, written once and standardised in place (same arithmetic as (x.float() - mean) / std)."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=torch.channels_last)
    return out.copy_(x).sub_(mean).div_(std)


_SOURCES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _crop_source(data: DeviceData) -> torch.Tensor:
    """The padded and mirrored training images, made once per dataset (what augment reads)."""
    key = id(data.x_train)
    if key not in _SOURCES or _SOURCES[key][0] is not data.x_train:
        _SOURCES[key] = (data.x_train, crop_source(data.x_train))
    return _SOURCES[key][1]


def train_batches(data: DeviceData, batch_size: int, generator: torch.Generator,
                  augment_images: bool = True, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented, normalised training batches. A batch of one is dropped
    (batch norm cannot train on it); with `drop_last` (static shapes for torch.compile) the last
    partial batch is dropped whenever there is a full one (its images come first in another epoch's
    shuffle)."""
    total = n = len(data.y_train)
    if drop_last and n >= batch_size:
        n -= n % batch_size
    perm = torch.randperm(total, generator=generator, device=generator.device).to(data.device)
    y = data.y_train[perm]
    if augment_images:
        x = augment(data.x_train, generator, index=perm, source=_crop_source(data))
    else:
        x = data.x_train[perm]
    for start in range(0, n, batch_size):
        if n - start < 2:
            break
        yield normalize(x[start:start + batch_size], data.mean, data.std), y[start:start + batch_size]


def eval_batches(x: torch.Tensor, y: torch.Tensor, data: DeviceData, batch_size: int,
                 pad: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised evaluation batches and their labels. With `pad`, every image batch has exactly
    `batch_size` rows (the last is padded with zero images; its labels are not): the caller scores
    only the first len(labels) rows."""
    for start in range(0, len(y), batch_size):
        xb = x[start:start + batch_size]
        if pad and len(xb) < batch_size:
            xb = torch.cat([xb, xb.new_zeros((batch_size - len(xb), *xb.shape[1:]))])
        yield normalize(xb, data.mean, data.std), y[start:start + batch_size]

"""Datasets behind one spec string, cached on the training device, with batched augmentation.

Specs: `cifar10` and `cifar100` (torchvision download into a data dir), a path to an `.npz` file
(`x_train`, `y_train`, `x_test`, `y_test`: uint8 N×H×W×C images with C = 1 or 3, integer labels
0..K−1 with K >= 2; an optional `classes` array of K names), `imagefolder:PATH` (PATH/train and
PATH/test, each a folder of class folders, read with torchvision's ImageFolder and resized once to
`image_size`), or `synthetic` (procedural, ships as code; `synthetic:N` sets the training-set size).
Arrays passed to `tuner.tune()` are registered under a generated `in-process:` name.

Each dataset is loaded once per process into uint8 tensors on the device. Augmentation (random
crop with zero padding, 4 at 32 px, and a horizontal flip; both settings) is one gather per epoch
over a cached padded (and mirrored) copy of the training images, never per image, with no host
sync; there are no DataLoader workers in the training loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tuner.errors import DataError

if TYPE_CHECKING:  # the setting's type only: the study layer's params import nothing of training at run time
    from tuner.study.params import Augment

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SYNTHETIC_CLASSES = tuple(f"{p}-{f}" for f in ("low", "high")
                          for p in ("hstripes", "vstripes", "checker", "rings", "hatch"))
SPLIT_SEED = 0  # the validation split is the same for every trial of a sweep, whatever its seed


@dataclass(frozen=True)
class RawDataset:
    """Host arrays, uint8 N×H×W×C images (C = 1 or 3) and int64 labels 0..len(classes)−1."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


@dataclass(frozen=True)
class DeviceData:
    """One dataset on the training device: uint8 N×C×H×W images, int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: torch.Tensor  # 1×C×1×1, in 0..255 pixel units, from the training split
    std: torch.Tensor
    classes: tuple[str, ...]

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int | tuple[int, int]:
        """The side of the (square) images, or (H, W)."""
        h, w = int(self.x_train.shape[2]), int(self.x_train.shape[3])
        return h if h == w else (h, w)


@dataclass(frozen=True)
class Shape:
    """What a model needs to know of a dataset: image channels and size, and the number of classes."""

    channels: int
    image_size: int | tuple[int, int]
    num_classes: int


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

def _folder(spec: str, data_dir: str | Path | None) -> Path:
    """The folder cifar10 and cifar100 live in: given resolved (settings.py: --data-dir,
    TUNER_DATA_DIR, the per-user cache dir); commands, `tuner.tune` and workers always pass it."""
    if not data_dir:
        raise DataError(f"dataset {spec!r}: no data folder given (pass data_dir, e.g. "
                        "tuner.study.settings.data_dir(None): --data-dir, TUNER_DATA_DIR or ~/.cache/tuner/data)")
    return Path(data_dir)


def load_raw(spec: str, data_dir: str | Path | None = None, *, image_size: int | None = None) -> RawDataset:
    """Resolve a dataset spec to host arrays."""
    if spec in _IN_PROCESS:
        return _IN_PROCESS[spec]
    if spec.startswith(IN_PROCESS):
        raise DataError(f"dataset {spec!r} was passed in-process to tuner.tune() and is not in this process; "
                        "pass the arrays again, or save them as an .npz file")
    if spec in ("cifar10", "cifar100"):
        folder = _folder(spec, data_dir)
        return load_cifar10(folder) if spec == "cifar10" else load_cifar100(folder)
    if spec.startswith(IMAGEFOLDER):
        return load_imagefolder(Path(spec[len(IMAGEFOLDER):]), image_size or 32)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        size = 4000
        if ":" in spec:
            try:
                size = int(spec.split(":", 1)[1])
            except ValueError:
                size = -1
            if size < 100:
                raise DataError(f"dataset {spec!r}: synthetic size must be a whole number >= 100", exit_code=2)
        return cached_synthetic(size, Path(data_dir)) if data_dir else make_synthetic(n_train=size)
    if spec.endswith(".npz") or os.sep in spec or Path(spec).exists():
        return load_npz(Path(spec))
    raise DataError(f"dataset {spec!r}: unknown spec (valid: cifar10, cifar100, synthetic, synthetic:N, "
                    "imagefolder:PATH, a path to an .npz file)", exit_code=2)


IMAGEFOLDER = "imagefolder:"
IN_PROCESS = "in-process:"
_IN_PROCESS: dict[str, RawDataset] = {}


def register_arrays(x_train: Any, y_train: Any, x_test: Any, y_test: Any, classes: Any = None, *,
                    spec: str | None = None) -> str:
    """Check arrays passed in-process (the `.npz` rules) and register them in this process's dataset
    cache under `spec` (default: a generated `in-process:arrays-...` name). Returns the spec."""
    spec = spec or f"{IN_PROCESS}arrays-{uuid.uuid4().hex[:12]}"
    arrays = {"x_train": np.asarray(x_train), "y_train": np.asarray(y_train), "x_test": np.asarray(x_test),
              "y_test": np.asarray(y_test)}
    _IN_PROCESS[spec] = check_arrays(arrays, None if classes is None else np.asarray(classes),
                                     where="data (in-process arrays)", name=spec)
    return spec


def is_registered(spec: str) -> bool:
    """Whether in-process arrays are registered under `spec` in this process."""
    return spec in _IN_PROCESS


def describe(spec: str, *, data_dir: str | Path | None = None, image_size: int | None = None) -> Shape:
    """The shape a model sees for `spec`, as cheaply as it can be known (no download: the CIFARs and
    synthetic are known; an .npz or an image folder is read)."""
    if spec in ("cifar10", "synthetic") or spec.startswith("synthetic:"):
        return Shape(3, 32, 10)
    if spec == "cifar100":
        return Shape(3, 32, 100)
    if spec.startswith(IMAGEFOLDER):
        root = Path(spec[len(IMAGEFOLDER):]) / "train"
        classes = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
        if len(classes) < 2:
            load_imagefolder(root.parent, image_size or 32)  # says what is wrong, in one line
        return Shape(3, image_size or 32, len(classes))
    raw = load_raw(spec, data_dir, image_size=image_size)
    h, w, c = raw.x_train.shape[1:]
    return Shape(int(c), int(h) if h == w else (int(h), int(w)), len(raw.classes))


def load_cifar10(data_dir: Path, *, download: bool = True) -> RawDataset:
    """CIFAR-10 through torchvision, downloaded (checksum-verified, with a progress bar) if absent."""
    from torchvision.datasets import CIFAR10  # torchvision: only when CIFAR-10 is the dataset

    return _load_cifar(CIFAR10, "cifar10", "CIFAR-10", data_dir, download)


def load_cifar100(data_dir: Path, *, download: bool = True) -> RawDataset:
    """CIFAR-100 (the 100 fine labels) through torchvision, downloaded and checked like CIFAR-10."""
    from torchvision.datasets import CIFAR100  # torchvision: only when CIFAR-100 is the dataset

    return _load_cifar(CIFAR100, "cifar100", "CIFAR-100", data_dir, download)


def _load_cifar(cls: Any, name: str, title: str, data_dir: Path, download: bool) -> RawDataset:
    def open_split(train: bool, fetch: bool) -> Any:
        return cls(root=str(data_dir), train=train, download=fetch)

    try:
        train, test = open_split(True, False), open_split(False, False)
    except RuntimeError:
        if not download:
            raise DataError(_cifar_missing(data_dir, "download disabled", title, cls.base_folder)) from None
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            train, test = open_split(True, True), open_split(False, False)
        except Exception as exc:  # URLError, OSError, checksum RuntimeError: all mean "not available"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(_cifar_missing(data_dir, reason, title, cls.base_folder)) from None
    return RawDataset(
        name=name,
        x_train=np.asarray(train.data, dtype=np.uint8),
        y_train=np.asarray(train.targets, dtype=np.int64),
        x_test=np.asarray(test.data, dtype=np.uint8),
        y_test=np.asarray(test.targets, dtype=np.int64),
        classes=tuple(train.classes),
    )


def _cifar_missing(data_dir: Path, reason: str, title: str = "CIFAR-10",
                   folder: str = "cifar-10-batches-py") -> str:
    return (f"{title} is not in {data_dir} and could not be downloaded ({reason}); "
            f"put the extracted {folder!r} folder in {data_dir} or pass --data-dir")


def load_npz(path: Path) -> RawDataset:
    """An `.npz` with x_train, y_train, x_test, y_test (uint8 N×H×W×C, C = 1 or 3; integer labels
    0..K−1, K >= 2) and optionally `classes` (K names; `label_names` is read too)."""
    if not path.is_file():
        raise DataError(f"dataset {path}: file not found", exit_code=2)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a single .npy array under an .npz name
            raise DataError(f"dataset {path}: not an .npz archive (it holds a single array)", exit_code=2)
        with loaded as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in npz.files}
            names_key = next((k for k in ("classes", "label_names") if k in npz.files), None)
            names = npz[names_key] if names_key else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"dataset {path}: not a readable .npz file ({exc})", exit_code=2) from None
    return check_arrays(arrays, names, where=f"dataset {path}", name=path.name)


def check_arrays(arrays: dict[str, np.ndarray], names: np.ndarray | None, *, where: str, name: str) -> RawDataset:
    """The `.npz` rules, for arrays from a file or passed in-process (DataError, exit 2, naming `where`)."""
    for key in ("x_train", "y_train", "x_test", "y_test"):
        if key not in arrays:
            raise DataError(f"{where}: missing array {key!r}", exit_code=2)
    for key in ("x_train", "x_test"):
        x = arrays[key]
        if x.ndim != 4 or x.shape[3] not in (1, 3) or min(x.shape[1:3]) < 4:
            raise DataError(f"{where}: {key} must have shape (N, H, W, C) with C = 1 or 3 and H, W >= 4, "
                            f"got {x.shape}", exit_code=2)
        if x.dtype != np.uint8:
            raise DataError(f"{where}: {key} must be uint8 (0..255 pixels), got {x.dtype}", exit_code=2)
    if arrays["x_test"].shape[1:] != arrays["x_train"].shape[1:]:
        raise DataError(f"{where}: x_test images are {arrays['x_test'].shape[1:]}, x_train images "
                        f"{arrays['x_train'].shape[1:]}: the shapes must agree", exit_code=2)
    for key, xkey in (("y_train", "x_train"), ("y_test", "x_test")):
        y = arrays[key]
        if y.ndim != 1 or len(y) != len(arrays[xkey]) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where}: {key} must be {len(arrays[xkey])} integer labels, "
                            f"got shape {y.shape} of {y.dtype}", exit_code=2)
    if len(arrays["y_train"]) < 20:
        raise DataError(f"{where}: x_train has too few images ({len(arrays['y_train'])})", exit_code=2)
    if names is not None and (names.ndim != 1 or len(names) < 2):
        raise DataError(f"{where}: classes must be a list of at least 2 names, got shape {names.shape}",
                        exit_code=2)
    k = len(names) if names is not None else int(arrays["y_train"].max()) + 1
    for key in ("y_train", "y_test"):
        y = arrays[key]
        if len(y) and (y.min() < 0 or y.max() >= k):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            source = f"{k} class names" if names is not None else f"y_train's labels 0..{k - 1}"
            raise DataError(f"{where}: {key} labels must be in 0..{k - 1} ({source}), found {bad}", exit_code=2)
    if k < 2:
        raise DataError(f"{where}: y_train has a single class; at least 2 are needed", exit_code=2)
    if names is not None:
        classes = tuple(str(n) for n in names.tolist())
    elif k == 10 and arrays["x_train"].shape[1:] == (32, 32, 3):
        classes = CIFAR10_CLASSES  # a CIFAR-10-shaped file without names
    else:
        classes = tuple(str(i) for i in range(k))
    return RawDataset(name=name, x_train=arrays["x_train"], y_train=arrays["y_train"].astype(np.int64),
                      x_test=arrays["x_test"], y_test=arrays["y_test"].astype(np.int64), classes=classes)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_imagefolder(root: Path, image_size: int = 32) -> RawDataset:
    """`root/train` and `root/test`, each a folder of class folders (torchvision's ImageFolder layout),
    as RGB images resized once to image_size × image_size. Classes are train's folders; a test class
    that train lacks is an error (exit 2), and so is a folder with no images. Files that cannot be
    decoded are skipped, with one warning that counts them."""
    from PIL import Image  # torchvision's image stack: only for image folders
    from torchvision.datasets import ImageFolder  # (importing torchvision costs every worker's start)

    where = f"dataset imagefolder:{root}"
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{where}: no {split}/ folder (expected {root / split}/CLASS/IMAGE files)", exit_code=2)
    found: dict[str, ImageFolder] = {}
    for split in ("train", "test"):
        try:
            found[split] = ImageFolder(str(root / split), loader=str, allow_empty=False,
                                       is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS))
        except (FileNotFoundError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{where}: {split}/ has no images in class folders ({reason})", exit_code=2) from None
    classes = found["train"].classes
    if len(classes) < 2:
        raise DataError(f"{where}: train/ has {len(classes)} class folder; at least 2 are needed", exit_code=2)
    extra = sorted(set(found["test"].classes) - set(classes))
    if extra:
        raise DataError(f"{where}: test/ has class folders that train/ lacks: {', '.join(extra[:5])}", exit_code=2)
    index = {c: i for i, c in enumerate(classes)}
    skipped: list[str] = []
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, folder in found.items():
        images, labels = [], []
        for path, label in folder.samples:
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
                    images.append(np.asarray(img, dtype=np.uint8))
            except (OSError, ValueError, Image.DecompressionBombError):
                skipped.append(path)
                continue
            labels.append(index[folder.classes[label]])
        if not images:
            raise DataError(f"{where}: {split}/ has no readable images", exit_code=2)
        out[split] = (np.stack(images), np.asarray(labels, dtype=np.int64))
    if skipped:
        print(f"warning: {where}: skipped {len(skipped)} unreadable image file{'s' if len(skipped) > 1 else ''} "
              f"(first: {skipped[0]})", file=sys.stderr, flush=True)
    if len(out["train"][1]) < 20:
        raise DataError(f"{where}: train/ has too few images ({len(out['train'][1])})", exit_code=2)
    return RawDataset(name=f"imagefolder:{root.name}", x_train=out["train"][0], y_train=out["train"][1],
                      x_test=out["test"][0], y_test=out["test"][1], classes=tuple(classes))


def cached_synthetic(n_train: int, folder: Path) -> RawDataset:
    """`make_synthetic(n_train)`, kept as an .npz in the data folder after the first call: drawing it
    costs a few hundred ms of every worker's start, loading it ~10 ms. The file name holds a digest
    of the generator's code and the torch version (whose RNG draws it), so a change to either makes
    a new file. A folder that cannot be written only means no cache."""
    digest = hashlib.sha1(f"{inspect.getsource(make_synthetic)}{torch.__version__}".encode()).hexdigest()[:12]
    path = folder / f"synthetic-{n_train}-{digest}.npz"
    try:
        with np.load(path) as npz:
            return RawDataset(name="synthetic", x_train=npz["x_train"], y_train=npz["y_train"],
                              x_test=npz["x_test"], y_test=npz["y_test"], classes=SYNTHETIC_CLASSES)
    except (OSError, KeyError, ValueError):
        pass
    raw = make_synthetic(n_train=n_train)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.savez(fh, x_train=raw.x_train, y_train=raw.y_train, x_test=raw.x_test, y_test=raw.y_test)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return raw


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
                 val_fraction: float = 0.1, image_size: int | None = None) -> DeviceData:
    """The dataset for `spec` on `device`, loaded once per process and reused across trials."""
    device = torch.device(device)
    if spec.endswith(".npz"):
        where = str(Path(spec).resolve())
    elif spec.startswith(IMAGEFOLDER):
        where = f"{IMAGEFOLDER}{Path(spec[len(IMAGEFOLDER):]).resolve()}@{image_size or 32}"
    else:
        where = spec
    folder = str(_folder(spec, data_dir)) if spec in ("cifar10", "cifar100") else None
    key = (where, folder, str(device), val_fraction)
    if key not in _CACHE:
        _CACHE[key] = to_device(load_raw(spec, data_dir, image_size=image_size), device, val_fraction)
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
            source: torch.Tensor | None = None, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding `pad` and (with `flip`) random horizontal flip, for a whole
    N×C×H×W batch.

    One gather and no host sync: the crop windows of `source` (`crop_source(x, pad)`, which holds
    each padded image and its mirror) are an `unfold`ed view, and image i is the window
    (image, dy, dx) of that view, with image `index[i]` or its mirror `index[i] + N`. A flipped
    crop at dx is the mirror's crop at 2·pad − dx, and dx is uniform, so reading the mirror at dx
    draws the same distribution. About 8 tensor ops per epoch, whatever N is. With `index`,
    augments `x[index]` (the shuffle is part of the gather). Without `flip`, only the unmirrored
    first N images of the source are read (and no mirror bit is drawn), so `source` may be just the
    padded images (`padded_source`). The result is a channels_last N×C×H×W view (what `normalize`
    and the models want).
    """
    n = x.shape[0] if index is None else len(index)
    total, c, h, w = x.shape
    dev = x.device
    if source is None:
        src = crop_source(x, pad) if flip else padded_source(x, pad)
    else:
        src = source
    span = 2 * pad + 1
    gdev = generator.device
    dy = torch.randint(0, span, (n,), generator=generator, device=gdev).to(dev)
    dx = torch.randint(0, span, (n,), generator=generator, device=gdev).to(dev)
    image = torch.arange(n, device=dev) if index is None else index
    if flip:
        mirror = torch.randint(0, 2, (n,), generator=generator, device=gdev).to(dev)
        image = mirror.mul_(total).add_(image)
    windows = src.unfold(1, h, 1).unfold(2, w, 1).permute(0, 1, 2, 4, 5, 3)  # 2N×span×span×H×W×C view
    return windows[image, dy, dx].permute(0, 3, 1, 2)


def padded_source(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """uint8 N×C×H×W → the contiguous, zero-padded N×(H+2p)×(W+2p)×C images, without mirrors: what
    `augment(..., flip=False)` crops from."""
    return torch.nn.functional.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1).contiguous()


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W → float, standardised, channels_last (what the models want). One float
    buffer, written once and standardised in place (same arithmetic as (x.float() - mean) / std)."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=torch.channels_last)
    return out.copy_(x).sub_(mean).div_(std)


_SOURCES: dict[tuple[int, int, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def _crop_source(data: DeviceData, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """The padded (and, with `flip`, mirrored) training images, made once per dataset and setting
    (what augment reads)."""
    key = (id(data.x_train), pad, flip)
    if key not in _SOURCES or _SOURCES[key][0] is not data.x_train:
        source = crop_source(data.x_train, pad) if flip else padded_source(data.x_train, pad)
        _SOURCES[key] = (data.x_train, source)
    return _SOURCES[key][1]


def train_batches(data: DeviceData, batch_size: int, generator: torch.Generator, augment_images: Augment | None,
                  drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented, normalised training batches. `augment_images` is the
    trial's `TrainingParams.augmentation` (crop padding and flip), or None for none.
    A batch of one is dropped (batch norm cannot train on it); with `drop_last` (static shapes for
    torch.compile) the last partial batch is dropped whenever there is a full one (its images come
    first in another epoch's shuffle). `epoch_images` and `batch_spans` are its two halves (trial
    packing draws each packed trial's epoch with the first and slices all of them with the second)."""
    x, y = epoch_images(data, generator, augment_images)
    for start, stop in batch_spans(len(y), batch_size, drop_last):
        yield normalize(x[start:stop], data.mean, data.std), y[start:stop]


def epoch_images(data: DeviceData, generator: torch.Generator,
                 augment_images: Augment | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's shuffled (and augmented) uint8 training images, N×C×H×W (a channels_last view
    when augmented), and their labels: all of the epoch's draws from `generator`, in the order
    `train_batches` makes them."""
    total = len(data.y_train)
    perm = torch.randperm(total, generator=generator, device=generator.device).to(data.device)
    y = data.y_train[perm]
    setting = augment_images
    if setting is not None:
        pad = setting.padding(min(data.x_train.shape[2:]))
        x = augment(data.x_train, generator, pad=pad, index=perm, source=_crop_source(data, pad, setting.flip),
                    flip=setting.flip)
    else:
        x = data.x_train[perm]
    return x, y


def batch_spans(n: int, batch_size: int, drop_last: bool = False) -> list[tuple[int, int]]:
    """(start, stop) of each training batch of an epoch of `n` images: a last batch of one is
    dropped, and with `drop_last` the last partial batch whenever there is a full one."""
    if drop_last and n >= batch_size:
        n -= n % batch_size
    spans = []
    for start in range(0, n, batch_size):
        if n - start < 2:
            break
        spans.append((start, min(start + batch_size, n)))
    return spans


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

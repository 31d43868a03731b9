"""Datasets: the synthetic source, batched augmentation, normalisation, the device cache and .npz files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tuner.errors import DataError
from tuner.study.params import Augment
from tuner.training.data import (
    CIFAR10_CLASSES,
    SYNTHETIC_CLASSES,
    augment,
    clear_cache,
    crop_source,
    load_dataset,
    load_npz,
    load_raw,
    make_synthetic,
    normalize,
    train_batches,
)

# ---------------------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic() -> None:
    a, b = make_synthetic(n_train=300, n_test=100), make_synthetic(n_train=300, n_test=100)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key
    other = make_synthetic(n_train=300, n_test=100, seed=99)
    assert not np.array_equal(a.x_train, other.x_train)


def test_synthetic_format_and_balance() -> None:
    raw = make_synthetic(n_train=1000, n_test=200)
    assert raw.x_train.shape == (1000, 32, 32, 3) and raw.x_train.dtype == np.uint8
    assert raw.x_test.shape == (200, 32, 32, 3) and raw.x_test.dtype == np.uint8
    assert raw.y_train.shape == (1000,) and raw.y_train.dtype == np.int64
    assert raw.classes == SYNTHETIC_CLASSES and len(raw.classes) == 10
    for y in (raw.y_train, raw.y_test):
        counts = np.bincount(y, minlength=10)
        assert len(counts) == 10
        expected = len(y) / 10
        assert counts.min() >= 0.6 * expected and counts.max() <= 1.4 * expected, counts
    # images use the pixel range, and differ from each other
    assert raw.x_train.min() < 30 and raw.x_train.max() > 225
    assert len({img.tobytes() for img in raw.x_train}) == len(raw.x_train)


def test_synthetic_spec_sizes() -> None:
    raw = load_raw("synthetic:150")
    assert len(raw.y_train) == 150 and raw.name == "synthetic"
    for bad in ("synthetic:50", "synthetic:abc", "synthetic:"):
        with pytest.raises(DataError) as info:
            load_raw(bad)
        assert info.value.exit_code == 2 and bad in str(info.value)


def test_unknown_spec() -> None:
    with pytest.raises(DataError) as info:
        load_raw("imagenet")
    assert info.value.exit_code == 2
    message = str(info.value)
    assert "imagenet" in message
    for valid in ("cifar10", "synthetic", ".npz"):
        assert valid in message


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(n: int = 16, low: int = 20, high: int = 240, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    x = torch.randint(low, high + 1, (n, 3, 32, 32), generator=gen(123))
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_keeps_shape_dtype_and_value_range(dtype: torch.dtype) -> None:
    x = random_images(dtype=dtype)
    out = augment(x, gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= x.max()
    # every output value is an input value, or 0 from the padding
    allowed = set(x.unique().tolist()) | {0}
    assert set(out.unique().tolist()) <= allowed
    assert (out == 0).any()  # some crops reached into the padding (x itself has no zeros)
    assert not (x == 0).any()


def test_augment_is_seeded() -> None:
    x = random_images(64)
    a, b = augment(x, gen(7)), augment(x, gen(7))
    assert torch.equal(a, b)
    c = augment(x, gen(8))
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_flip_mirrors_horizontally() -> None:
    # an image that is different under a horizontal and a vertical flip
    cols = torch.arange(32, dtype=torch.uint8)[None, :].expand(32, 32)
    rows = (torch.arange(32, dtype=torch.uint8) * 2)[:, None].expand(32, 32)
    img = torch.stack([cols + 1, rows + 1, cols + rows + 1])  # 3×32×32, no zeros
    x = img[None].repeat(64, 1, 1, 1)
    out = augment(x, gen(3), pad=0)  # no crop: only the flip remains
    mirrored = img.flip(-1)  # reading the columns backwards
    same = [bool(torch.equal(o, img)) for o in out]
    flipped = [bool(torch.equal(o, mirrored)) for o in out]
    assert all(s or f for s, f in zip(same, flipped))  # each image is the original or its mirror
    assert any(same) and any(flipped)  # both happen (probability of failing: 2**-63)
    assert 0.25 < sum(flipped) / len(out) < 0.75
    # it is a left-right mirror, not an up-down one
    assert not torch.equal(mirrored, img.flip(-2))
    assert torch.equal(mirrored[0, 0], torch.arange(32, 0, -1, dtype=torch.uint8))


def test_crop_shifts_by_at_most_pad() -> None:
    n, pad = 512, 4
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    r0, c0 = 13, 9  # one marker pixel, away from the centre column so a flip moves it
    x[:, :, r0, c0] = 255
    out = augment(x, gen(11), pad=pad)
    dys, dxs = [], []
    for o in out:
        where = (o[0] == 255).nonzero()
        assert len(where) == 1  # the marker is more than 4 px from every border: it always survives
        r, c = where[0].tolist()
        # undo a possible flip: the flipped marker sits at column 31 - c0 + shift
        dx_plain, dx_flip = c - c0, c - (31 - c0)
        dx = dx_plain if abs(dx_plain) <= pad else dx_flip
        dys.append(r - r0)
        dxs.append(dx)
        assert torch.equal(o[1], o[0]) and torch.equal(o[2], o[0])  # channels move together
    assert max(map(abs, dys)) <= pad and max(map(abs, dxs)) <= pad
    # the whole range of shifts is used (each extreme has probability 1/9 per image)
    assert set(dys) == set(range(-pad, pad + 1))
    assert set(dxs) == set(range(-pad, pad + 1))


def test_every_output_is_a_padded_crop_of_its_input() -> None:
    pad = 4
    x = random_images(12)
    out = augment(x, gen(5), pad=pad)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    for i in range(len(x)):
        candidates = [p[:, dy:dy + 32, dx:dx + 32] for p in (padded[i], padded[i].flip(-1))
                      for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        assert any(torch.equal(out[i], c) for c in candidates), i


# ---------------------------------------------------------------------------------------------
# Device data: normalisation, split, cache, batches
# ---------------------------------------------------------------------------------------------

def test_normalize_standardises_train_split() -> None:
    data = load_dataset("synthetic:400")
    xn = normalize(data.x_train, data.mean, data.std)
    assert xn.dtype == torch.float32 and xn.shape == data.x_train.shape
    assert xn.is_contiguous(memory_format=torch.channels_last)
    mean = xn.mean(dim=(0, 2, 3))
    std = xn.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4), mean
    assert torch.allclose(std, torch.ones(3), atol=1e-3), std
    assert data.mean.shape == (1, 3, 1, 1) and data.std.shape == (1, 3, 1, 1)


def test_load_dataset_caches() -> None:
    a = load_dataset("synthetic:200")
    assert load_dataset("synthetic:200") is a
    assert load_dataset("synthetic:200", "cpu", val_fraction=0.1) is a
    assert load_dataset("synthetic:200", val_fraction=0.2) is not a
    clear_cache()
    b = load_dataset("synthetic:200")
    assert b is not a and torch.equal(a.x_val, b.x_val)


def _keys(x: torch.Tensor) -> list[bytes]:
    return [img.numpy().tobytes() for img in x]


@pytest.mark.parametrize("val_fraction", [None, 0.25])
def test_validation_split(val_fraction: float | None) -> None:
    spec, n = "synthetic:300", 300
    kw = {} if val_fraction is None else {"val_fraction": val_fraction}
    fraction = 0.1 if val_fraction is None else val_fraction
    clear_cache()
    torch.manual_seed(1)
    a = load_dataset(spec, **kw)
    clear_cache()
    torch.manual_seed(2)  # the split does not follow the global seed
    b = load_dataset(spec, **kw)
    assert len(a.y_val) == round(n * fraction) and len(a.y_train) == n - len(a.y_val)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_val, b.y_val)
    assert torch.equal(a.x_train, b.x_train)
    train_keys, val_keys = _keys(a.x_train), _keys(a.x_val)
    assert not set(train_keys) & set(val_keys)  # disjoint
    # together they are exactly the source training set, each image with its own label
    raw = load_raw(spec)
    source = {img.transpose(2, 0, 1).tobytes(): int(y) for img, y in zip(raw.x_train, raw.y_train)}
    assert len(source) == n
    assert sorted(train_keys + val_keys) == sorted(source)
    for keys, labels in ((train_keys, a.y_train), (val_keys, a.y_val)):
        assert [source[k] for k in keys] == labels.tolist()
    # the test split is untouched
    assert len(a.y_test) == len(raw.y_test)
    assert a.x_train.dtype == torch.uint8 and a.x_train.shape[1:] == (3, 32, 32)


def test_train_batches_cover_the_epoch() -> None:
    data = load_dataset("synthetic:200")
    n = len(data.y_train)
    batches = list(train_batches(data, 64, gen(0), augment_images=None))
    sizes = [len(y) for _, y in batches]
    assert sum(sizes) == n and max(sizes) == 64
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(data.y_train.tolist())
    assert not torch.equal(labels, data.y_train)  # shuffled
    # a last batch of one image is dropped (batch norm cannot train on it)
    sizes = [len(y) for _, y in train_batches(data, n - 1, gen(0), Augment())]
    assert sizes == [n - 1]


def test_flip_off_never_mirrors_and_still_crops() -> None:
    cols = torch.arange(28, dtype=torch.uint8)[None, :].expand(28, 28)
    img = (cols + 1)[None]  # 1×28×28, one channel, different under a mirror
    x = img[None].repeat(64, 1, 1, 1)
    assert torch.equal(augment(x, gen(3), pad=0, flip=False), x)  # no crop, no flip: the images themselves
    index = torch.randperm(64, generator=gen(1))
    assert torch.equal(augment(x, gen(3), pad=0, index=index, flip=False), x[index])
    out = augment(x, gen(4), pad=3, flip=False)
    padded = torch.nn.functional.pad(img, (3, 3, 3, 3))
    plain = [padded[:, dy:dy + 28, dx:dx + 28] for dy in range(7) for dx in range(7)]
    assert all(any(torch.equal(o, c) for c in plain) for o in out)  # every output an unmirrored crop
    assert len({o.numpy().tobytes() for o in out}) > 5  # it did crop
    # with flip on, the same data is mirrored about half the time (the flip switch is what turns it off)
    on = augment(x, gen(4), pad=0)
    assert 0.25 < sum(bool(torch.equal(o, img.flip(-1))) for o in on) / 64 < 0.75


def test_train_batches_follow_the_augment_setting() -> None:

    data = load_dataset("synthetic:200")
    off = [x for x, _ in train_batches(data, 64, gen(0), augment_images=None)]
    still = [x for x, _ in train_batches(data, 64, gen(0), augment_images=Augment(crop_padding=0, flip=False))]
    assert all(torch.equal(a, b) for a, b in zip(off, still))  # no crop, no flip: only the shuffle
    default = [x for x, _ in train_batches(data, 64, gen(0), augment_images=Augment())]
    explicit = [x for x, _ in train_batches(data, 64, gen(0), augment_images=Augment(crop_padding=4, flip=True))]
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))  # true is pad 4 and flip at 32 px
    assert not all(torch.equal(a, b) for a, b in zip(default, off))
    # the padding scales with the image size when it is not given
    assert Augment().padding(32) == 4 and Augment().padding(28) == 4 and Augment().padding(64) == 8
    assert Augment().padding(16) == 2 and Augment().padding(8) == 1 and Augment(crop_padding=0).padding(64) == 0


# ---------------------------------------------------------------------------------------------
# .npz files
# ---------------------------------------------------------------------------------------------

def _arrays(n_train: int = 60, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.int64),
        "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.int32),
    }


def test_npz_good_file(tmp_path: Path) -> None:
    arrays = _arrays()
    path = tmp_path / "mini.npz"
    names = np.array([f"class{i}" for i in range(10)])
    np.savez(path, **arrays, label_names=names)
    raw = load_raw(str(path))
    assert raw.name == "mini.npz"
    for key, value in arrays.items():
        assert np.array_equal(getattr(raw, key), value)
    assert raw.y_test.dtype == np.int64 and raw.x_train.dtype == np.uint8
    assert raw.classes == tuple(names.tolist())
    # without label_names the CIFAR-10 names are used
    plain = tmp_path / "plain.npz"
    np.savez(plain, **arrays)
    assert load_npz(plain).classes == CIFAR10_CLASSES
    data = load_dataset(str(path))
    assert len(data.y_train) + len(data.y_val) == len(arrays["y_train"])
    assert len(data.y_test) == len(arrays["y_test"])


def _bad_npz(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.npz"
    arrays = _arrays()
    if case == "missing-key":
        del arrays["y_test"]
    elif case == "wrong-shape":
        arrays["x_train"] = np.zeros((60, 3, 32, 32), dtype=np.uint8)
    elif case == "grey":
        arrays["x_test"] = np.zeros((20, 32, 32), dtype=np.uint8)
    elif case == "wrong-dtype":
        arrays["x_train"] = arrays["x_train"].astype(np.float32)
    elif case == "label-count":
        arrays["y_train"] = arrays["y_train"][:-1]
    elif case == "label-range":
        arrays["y_test"][0] = 10
    elif case == "float-labels":
        arrays["y_train"] = arrays["y_train"].astype(np.float64)
    elif case == "too-few":
        arrays["x_train"], arrays["y_train"] = arrays["x_train"][:5], arrays["y_train"][:5]
    elif case == "pickled-object":
        arrays["x_train"] = np.array([object()] * 3, dtype=object)
    if case == "corrupt":
        path.write_bytes(np.random.default_rng(1).bytes(2000))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "npy-inside":
        with open(path, "wb") as fh:  # a plain .npy array under an .npz name
            np.save(fh, arrays["x_train"])
    elif case == "truncated":
        np.savez(path, **arrays)
        path.write_bytes(path.read_bytes()[:3000])
    elif case != "missing-file":
        np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case,words", [
    ("missing-key", "y_test"),
    ("wrong-shape", "x_train"),
    ("grey", "x_test"),
    ("wrong-dtype", "uint8"),
    ("label-count", "y_train"),
    ("label-range", "y_test"),
    ("float-labels", "y_train"),
    ("too-few", "too few"),
    ("pickled-object", "npz"),
    ("corrupt", "npz"),
    ("truncated", "npz"),
    ("npy-inside", "npz"),
    ("empty", "npz"),
    ("missing-file", "not found"),
])
def test_npz_errors(tmp_path: Path, case: str, words: str) -> None:
    path = _bad_npz(tmp_path, case)
    for load in (lambda: load_npz(path), lambda: load_raw(str(path)), lambda: load_dataset(str(path))):
        with pytest.raises(DataError) as info:
            load()
        assert info.value.exit_code == 2
        message = str(info.value)
        assert str(path) in message
        assert words in message


# ---------------------------------------------------------------------------------------------
# The real subset
# ---------------------------------------------------------------------------------------------

def test_real_subset(subset_path: Path) -> None:
    raw = load_raw(str(subset_path))
    assert raw.x_train.shape == (5085, 32, 32, 3) and raw.x_test.shape == (1017, 32, 32, 3)
    assert raw.y_train.shape == (5085,) and raw.y_test.shape == (1017,)
    assert raw.x_train.dtype == np.uint8 and raw.y_train.dtype == np.int64
    assert raw.classes == CIFAR10_CLASSES
    assert set(np.unique(raw.y_train).tolist()) == set(range(10))
    data = load_dataset(str(subset_path))
    assert len(data.y_train) + len(data.y_val) == 5085
    assert len(data.y_val) == round(5085 * 0.1)
    assert data.x_train.shape[1:] == (3, 32, 32)
    # real photos: per-channel mean and std in a plausible pixel range
    assert torch.all((data.mean > 90) & (data.mean < 160))
    assert torch.all((data.std > 40) & (data.std < 90))


def _aten_ops(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def test_augment_is_a_few_ops_per_epoch_whatever_its_size_and_never_syncs() -> None:
    """One gather over the unfolded crop windows: the operator count does not grow with N (the
    grouped copy it replaced made ~929 calls per CIFAR-10 epoch), and nothing reads a value back
    to the host (`.item()`, `.tolist()` and `bincount` sizes show up as _local_scalar_dense)."""
    counts = []
    for n in (64, 4096):
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
        source = crop_source(x)
        index = torch.randperm(n, generator=gen(1))
        ops = _aten_ops(lambda x=x, index=index, source=source: augment(x, gen(2), index=index, source=source))
        assert not any("local_scalar_dense" in op or op == "aten::item" for op in ops), ops
        counts.append(len(ops))
    assert counts[0] == counts[1] and counts[0] <= 40, counts
    # and a whole epoch of batches: the augmentation plus one normalisation per batch, no syncs
    data = load_dataset("synthetic:2000")
    ops = _aten_ops(lambda: list(train_batches(data, 512, gen(3), Augment())))
    assert not any("local_scalar_dense" in op or op == "aten::item" for op in ops), ops

"""Your own data: real sweeps with pruning on a 1-channel 28×28 `.npz` with 5 classes, on an image folder
written as PNGs, and on CIFAR-100 through torchvision's real loader pointed at a local folder in the
release's format; plus the loaders' rules."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState
from sweeps import assert_clean_finish, states, study_file, trials
from torchvision.datasets import CIFAR100

from conftest import ONE_THREAD, cli_main
from tuner.errors import DataError
from tuner.training.data import (
    describe,
    load_cifar100,
    load_dataset,
    load_imagefolder,
    load_npz,
    load_raw,
    make_synthetic,
)


def sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


# ---------------------------------------------------------------------------------------------
# A 1-channel 28×28 .npz with 5 classes
# ---------------------------------------------------------------------------------------------

def grey_npz(path: Path, n_train: int = 1400, n_test: int = 300) -> Path:
    """The synthetic textures' first 5 classes (stripes, checkers, rings, hatch), grey and cropped to 28×28."""
    raw = make_synthetic(n_train=n_train, n_test=n_test, seed=5)

    def grey(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = y < 5
        g = x[keep].mean(axis=3, keepdims=True)[:, 2:30, 2:30].round().astype(np.uint8)
        return g, y[keep]

    x_train, y_train = grey(raw.x_train, raw.y_train)
    x_test, y_test = grey(raw.x_test, raw.y_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             classes=np.array(["hstripes", "vstripes", "checker", "rings", "hatch"]))
    return path


def test_sweep_on_a_grey_28px_npz_with_5_classes(tmp_path: Path, cli) -> None:
    data = grey_npz(tmp_path / "grey.npz")
    raw = load_npz(data)
    assert raw.x_train.shape[1:] == (28, 28, 1) and raw.classes[0] == "hstripes" and len(raw.classes) == 5
    url = sqlite(tmp_path)
    path = study_file(tmp_path, name="grey", dataset=str(data), n_trials=8,
                      training={"augment": {"flip": False}})  # stripes: a flip would not hurt, digits would
    run = cli("sweep", str(path), "--storage", url, env=ONE_THREAD)
    assert run.returncode == 0, run.stderr
    assert_clean_finish(url, "grey", 8)
    counts = states(url, "grey")
    assert counts.get("PRUNED", 0) >= 1 and counts.get("COMPLETE", 0) >= 1, counts
    study = optuna.load_study(study_name="grey", storage=url)
    assert study.best_value > 0.3  # 5 classes: chance is 0.2; the tiny net learns from 1 channel (0.35 here)
    for t in trials(url, "grey"):
        assert t.user_attrs["params"]["training"]["augment"] == {"crop_padding": None, "flip": False}


# ---------------------------------------------------------------------------------------------
# An image folder of PNGs (from the real CIFAR-10 subset)
# ---------------------------------------------------------------------------------------------

CLASSES = ("airplane", "automobile", "bird", "cat")


@pytest.fixture(scope="module")
def image_folder(subset_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("images") / "pets"
    with np.load(subset_path) as npz:
        x_train, y_train, x_test, y_test = (npz[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    for split, x, y, per_class in (("train", x_train, y_train, 36), ("test", x_test, y_test, 10)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, img in enumerate(x[y == label][:per_class]):
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image: ignored by extension")
    return root


def test_imagefolder_loads_resized_and_counts_unreadable_files(image_folder: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    raw = load_imagefolder(image_folder, image_size=24)
    assert raw.classes == tuple(sorted(CLASSES))
    assert raw.x_train.shape == (4 * 36, 24, 24, 3) and raw.x_test.shape == (4 * 10, 24, 24, 3)
    assert raw.x_train.dtype == np.uint8 and raw.y_train.dtype == np.int64
    assert np.bincount(raw.y_train).tolist() == [36] * 4
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image file" in err and "broken.png" in err
    assert describe(f"imagefolder:{image_folder}", image_size=24).num_classes == 4
    data = load_dataset(f"imagefolder:{image_folder}", image_size=24)
    assert tuple(data.x_train.shape[1:]) == (3, 24, 24) and data.image_size == 24
    assert load_dataset(f"imagefolder:{image_folder}", image_size=24) is data  # cached on the device
    assert load_dataset(f"imagefolder:{image_folder}").image_size == 32  # another size, another entry


def test_sweep_on_an_image_folder(image_folder: Path, tmp_path: Path, cli) -> None:
    url = sqlite(tmp_path)
    path = study_file(tmp_path, name="folder", dataset=f"imagefolder:{image_folder}", n_trials=6, epochs=2,
                      batch_size=32, training={"image_size": 24})
    run = cli("sweep", str(path), "--storage", url, env=ONE_THREAD)
    assert run.returncode == 0, run.stderr
    assert "skipped 1 unreadable image file" in run.stderr
    assert_clean_finish(url, "folder", 6)
    ts = trials(url, "folder")
    assert any(t.state == TrialState.COMPLETE for t in ts)
    assert all(len(t.intermediate_values) == t.user_attrs["epochs"] for t in ts)  # reported to the pruner
    assert ts[0].user_attrs["params"]["training"]["image_size"] == 24


def test_an_empty_image_folder_is_refused(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / "empty" / split / "a").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        load_raw(f"imagefolder:{tmp_path / 'empty'}")
    assert info.value.exit_code == 2 and "train/" in str(info.value) and "empty" in str(info.value)
    with pytest.raises(DataError, match="no test/ folder"):
        (tmp_path / "half" / "train").mkdir(parents=True)
        load_raw(f"imagefolder:{tmp_path / 'half'}")


# ---------------------------------------------------------------------------------------------
# CIFAR-100 through torchvision's loader, from a local folder in the release's format
# ---------------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 400, 100


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar100_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, np.ndarray]]:
    """cifar-100-python/{train,test,meta}: pickled dicts as in the release (N×3072 CHW rows, fine_labels,
    coarse_labels; fine_label_names), and torchvision pointed at their checksums (this process only)."""
    rng = np.random.default_rng(0)
    raw = make_synthetic(n_train=N_TRAIN, n_test=N_TEST, seed=9)
    fine = {"train": rng.permutation(np.arange(N_TRAIN) % 100), "test": rng.permutation(np.arange(N_TEST) % 100)}
    data_dir = tmp_path / "data"
    folder = data_dir / CIFAR100.base_folder
    folder.mkdir(parents=True)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)

    for split, x in (("train", raw.x_train), ("test", raw.x_test)):
        dump(split, {"filenames": [f"{split}_{i}.png" for i in range(len(x))], "batch_label": f"{split}ing batch",
                     "fine_labels": fine[split].tolist(), "coarse_labels": (fine[split] // 5).tolist(),
                     "data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3072))})
    names = [f"class_{i:02d}" for i in range(100)]
    dump("meta", {"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]})
    monkeypatch.setattr(CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": _md5(folder / "meta")})
    monkeypatch.setattr(CIFAR100, "url", "http://127.0.0.1:9/nothing-to-download")
    return data_dir, {"x_train": raw.x_train, "x_test": raw.x_test, "y_train": fine["train"],
                      "y_test": fine["test"]}


def test_cifar100_loads_through_torchvision(cifar100_dir) -> None:
    data_dir, expected = cifar100_dir
    raw = load_cifar100(data_dir, download=False)
    assert raw.name == "cifar100" and len(raw.classes) == 100 and raw.classes[7] == "class_07"
    for key, value in expected.items():
        assert np.array_equal(getattr(raw, key), value), key
    assert raw.y_train.dtype == np.int64
    assert np.array_equal(load_raw("cifar100", data_dir).x_test, expected["x_test"])
    assert describe("cifar100").num_classes == 100


def test_cifar100_downloads_into_the_data_dir(tmp_path: Path, cifar100_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """The release's archive layout (cifar-100-python.tar.gz), served over HTTP from 127.0.0.1."""
    import http.server
    import tarfile
    import threading
    from functools import partial

    source, expected = cifar100_dir
    served = tmp_path / "served"
    served.mkdir()
    tgz = served / CIFAR100.filename
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(source / CIFAR100.base_folder, arcname=CIFAR100.base_folder)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt: str, *args: object) -> None:
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(CIFAR100, "url", f"http://127.0.0.1:{httpd.server_address[1]}/{CIFAR100.filename}")
    monkeypatch.setattr(CIFAR100, "tgz_md5", _md5(tgz))
    try:
        data_dir = tmp_path / "fresh" / "nested"
        raw = load_cifar100(data_dir)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
    assert f"/{CIFAR100.filename}" in requests  # it really came over HTTP
    assert (data_dir / CIFAR100.base_folder / "train").is_file()
    assert np.array_equal(raw.x_train, expected["x_train"]) and np.array_equal(raw.y_test, expected["y_test"])


def test_cifar100_absent_is_a_data_error(tmp_path: Path, cifar100_dir) -> None:
    with pytest.raises(DataError) as info:
        load_cifar100(tmp_path / "elsewhere", download=False)
    assert info.value.exit_code == 1
    assert "CIFAR-100" in str(info.value) and CIFAR100.base_folder in str(info.value)
    assert "--data-dir" in str(info.value)


def test_sweep_on_cifar100(tmp_path: Path, cifar100_dir, capsys: pytest.CaptureFixture[str], one_thread) -> None:
    data_dir, _ = cifar100_dir
    url = sqlite(tmp_path)
    path = study_file(tmp_path, name="c100", dataset="cifar100", n_trials=5, epochs=2,
                      pruner={"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}})
    code, out, err = cli_main(capsys, "sweep", str(path), "--storage", url, "--data-dir", str(data_dir))
    assert code == 0, err
    assert_clean_finish(url, "c100", 5)
    ts = trials(url, "c100")
    assert any(t.state == TrialState.COMPLETE for t in ts)
    assert all(len(t.intermediate_values) == t.user_attrs["epochs"] for t in ts)
    assert yaml.safe_load(path.read_text())["dataset"] == "cifar100"
    assert optuna.load_study(study_name="c100", storage=url).user_attrs["tuner_config"]["dataset"] == "cifar100"
    assert "c100" in out


# ---------------------------------------------------------------------------------------------
# .npz rules for any shape and number of classes
# ---------------------------------------------------------------------------------------------

def _arrays(k: int = 3, shape: tuple[int, ...] = (16, 16, 1)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (60, *shape), dtype=np.uint8), "y_train": np.arange(60) % k,
            "x_test": rng.integers(0, 256, (20, *shape), dtype=np.uint8), "y_test": np.arange(20) % k}


def test_npz_any_shape_and_class_count(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", **_arrays(3, (16, 20, 1)))
    raw = load_npz(tmp_path / "a.npz")
    assert raw.classes == ("0", "1", "2") and raw.x_train.shape[1:] == (16, 20, 1)
    shape = describe(str(tmp_path / "a.npz"))
    assert (shape.channels, shape.image_size, shape.num_classes) == (1, (16, 20), 3)
    data = load_dataset(str(tmp_path / "a.npz"))
    assert tuple(data.mean.shape) == (1, 1, 1, 1) and data.in_channels == 1 and data.num_classes == 3
    # class names may name classes that no image has
    np.savez(tmp_path / "b.npz", **_arrays(3), classes=np.array(["x", "y", "z", "w"]))
    assert load_npz(tmp_path / "b.npz").classes == ("x", "y", "z", "w")


@pytest.mark.parametrize("case,words", [
    ("label-out-of-range", ["y_test", "0..2", "found 5"]),
    ("negative-label", ["y_train", "found -1"]),
    ("more-labels-than-names", ["y_train", "0..1", "2 class names"]),
    ("not-uint8", ["x_train", "uint8", "float32"]),
    ("shapes-disagree", ["x_test", "x_train", "agree"]),
    ("five-channels", ["x_train", "C = 1 or 3"]),
    ("one-class", ["single class"]),
])
def test_npz_bad_input(tmp_path: Path, case: str, words: list[str]) -> None:
    arrays: dict[str, np.ndarray] = dict(_arrays())
    extra: dict[str, np.ndarray] = {}
    if case == "label-out-of-range":
        arrays["y_test"] = arrays["y_test"].copy()
        arrays["y_test"][3] = 5
    elif case == "negative-label":
        arrays["y_train"] = arrays["y_train"].copy()
        arrays["y_train"][0] = -1
    elif case == "more-labels-than-names":
        extra["classes"] = np.array(["a", "b"])
    elif case == "not-uint8":
        arrays["x_train"] = arrays["x_train"].astype(np.float32)
    elif case == "shapes-disagree":
        arrays["x_test"] = np.zeros((20, 16, 16, 3), dtype=np.uint8)
    elif case == "five-channels":
        arrays["x_train"] = np.zeros((60, 16, 16, 5), dtype=np.uint8)
    elif case == "one-class":
        arrays["y_train"], arrays["y_test"] = np.zeros(60, dtype=np.int64), np.zeros(20, dtype=np.int64)
    path = tmp_path / f"{case}.npz"
    np.savez(path, **arrays, **extra)
    with pytest.raises(DataError) as info:
        load_npz(path)
    assert info.value.exit_code == 2
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message, (word, message)

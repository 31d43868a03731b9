"""The `cifar10` source through torchvision's real CIFAR10 loader, against a local server: no test contacts the
internet. The archive is built in the real format (cifar-10-batches-py/data_batch_1..5, test_batch,
batches.meta: pickled dicts with "data" N×3072 uint8 rows in CHW order, "labels", "label_names")."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import socket
import socketserver
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import CIFAR10

from tuner.errors import DataError
from tuner.study.settings import Flags, resolve
from tuner.training.data import CIFAR10_CLASSES, load_cifar10, load_dataset, load_raw, make_synthetic

PER_BATCH, N_TEST = 40, 30
FOLDER = CIFAR10.base_folder  # cifar-10-batches-py
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
              "no_proxy", "NO_PROXY")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@dataclass
class Archive:
    folder: Path  # where cifar-10-python.tar.gz is served from
    tgz_md5: str
    md5s: dict[str, str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    raw = make_synthetic(n_train=5 * PER_BATCH, n_test=N_TEST, seed=7)
    build = tmp_path_factory.mktemp("build")
    batches = build / FOLDER
    batches.mkdir()

    def dump(name: str, obj: dict) -> None:
        with open(batches / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)

    def rows(x: np.ndarray) -> np.ndarray:  # N×32×32×3 → N×3072, the red plane first, as in the release
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3072))

    for i in range(5):
        part = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
        dump(f"data_batch_{i + 1}", {"batch_label": f"training batch {i + 1} of 5", "labels": raw.y_train[part].tolist(),
                                     "data": rows(raw.x_train[part]),
                                     "filenames": [f"img_{i}_{j}.png" for j in range(PER_BATCH)]})
    dump("test_batch", {"batch_label": "testing batch 1 of 1", "labels": raw.y_test.tolist(),
                        "data": rows(raw.x_test), "filenames": [f"test_{j}.png" for j in range(N_TEST)]})
    dump("batches.meta", {"num_cases_per_batch": PER_BATCH, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072})

    served = tmp_path_factory.mktemp("served")
    tgz = served / CIFAR10.filename
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(batches, arcname=FOLDER)
    return Archive(folder=served, tgz_md5=md5(tgz), md5s={p.name: md5(p) for p in batches.iterdir()},
                   x_train=raw.x_train, y_train=raw.y_train, x_test=raw.x_test, y_test=raw.y_test)


class _Server:
    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, fmt: str, *args: object) -> None:  # quiet, but remembered
                requests.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{CIFAR10.filename}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server(archive: Archive) -> Iterator[_Server]:
    srv = _Server(archive.folder)
    try:
        yield srv
    finally:
        srv.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def patch_cifar(monkeypatch: pytest.MonkeyPatch, archive: Archive):
    """Point torchvision's CIFAR10 at a URL and at the archive's checksums (this process only)."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)  # straight to 127.0.0.1

    def apply(url: str) -> None:
        assert urllib.parse.urlparse(url).hostname == "127.0.0.1"
        monkeypatch.setattr(CIFAR10, "url", url)
        monkeypatch.setattr(CIFAR10, "tgz_md5", archive.tgz_md5)
        monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", archive.md5s[f"data_batch_{i}"]]
                                                    for i in range(1, 6)])
        monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", archive.md5s["test_batch"]]])
        monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": archive.md5s["batches.meta"]})
    return apply


def assert_loaded(raw, archive: Archive) -> None:
    assert raw.name == "cifar10"
    assert raw.x_train.shape == (5 * PER_BATCH, 32, 32, 3) and raw.x_train.dtype == np.uint8
    assert raw.x_test.shape == (N_TEST, 32, 32, 3)
    assert np.array_equal(raw.x_train, archive.x_train) and np.array_equal(raw.x_test, archive.x_test)
    assert np.array_equal(raw.y_train, archive.y_train) and np.array_equal(raw.y_test, archive.y_test)
    assert raw.y_train.dtype == np.int64
    assert raw.classes == CIFAR10_CLASSES


def test_downloads_verifies_and_loads(tmp_path: Path, archive: Archive, server: _Server, patch_cifar) -> None:
    patch_cifar(server.url)
    data_dir = tmp_path / "data" / "nested"  # created on demand
    raw = load_cifar10(data_dir)
    assert_loaded(raw, archive)
    assert f"/{CIFAR10.filename}" in server.requests  # it really came over HTTP
    assert (data_dir / FOLDER).is_dir()
    assert md5(data_dir / CIFAR10.filename) == archive.tgz_md5


def test_second_call_uses_the_local_copy(tmp_path: Path, archive: Archive, server: _Server, patch_cifar,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    patch_cifar(server.url)
    data_dir = tmp_path / "data"
    load_cifar10(data_dir)
    server.close()
    count = len(server.requests)
    patch_cifar(f"http://127.0.0.1:{closed_port()}/{CIFAR10.filename}")  # and nothing to download from
    assert_loaded(load_cifar10(data_dir), archive)
    assert_loaded(load_cifar10(data_dir, download=False), archive)
    # through the spec, the --data-dir argument and TUNER_DATA_DIR
    assert_loaded(load_raw("cifar10", data_dir), archive)
    monkeypatch.setenv("TUNER_DATA_DIR", str(data_dir))
    assert_loaded(load_raw("cifar10", resolve(Flags()).data_dir), archive)  # the folder arrives resolved
    data = load_dataset("cifar10", data_dir=data_dir)
    assert len(data.y_train) + len(data.y_val) == 5 * PER_BATCH and len(data.y_test) == N_TEST
    assert len(server.requests) == count


def test_unreachable_and_absent_is_a_data_error(tmp_path: Path, patch_cifar) -> None:
    patch_cifar(f"http://127.0.0.1:{closed_port()}/{CIFAR10.filename}")
    empty = tmp_path / "empty"
    with pytest.raises(DataError) as info:
        load_cifar10(empty)
    assert info.value.exit_code == 1
    message = str(info.value)
    assert str(empty) in message and FOLDER in message and "--data-dir" in message
    assert "\n" not in message
    with pytest.raises(DataError, match="download disabled") as info:
        load_cifar10(tmp_path / "other", download=False)
    assert info.value.exit_code == 1 and FOLDER in str(info.value)


def test_checksum_mismatch_is_a_data_error(tmp_path: Path, server: _Server, patch_cifar,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    patch_cifar(server.url)
    monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)  # the download does not match the expected checksum
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path / "data")
    assert info.value.exit_code == 1 and FOLDER in str(info.value)
    assert server.requests  # it did download, then refused the file


def test_corrupt_local_copy_is_downloaded_again(tmp_path: Path, archive: Archive, server: _Server,
                                                patch_cifar) -> None:
    patch_cifar(server.url)
    data_dir = tmp_path / "data"
    load_cifar10(data_dir)
    batch = data_dir / FOLDER / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-10])  # damaged: fails its checksum
    assert_loaded(load_cifar10(data_dir), archive)
    assert md5(batch) == archive.md5s["data_batch_3"]


# ---------------------------------------------------------------------------------------------
# The CLI, in a subprocess: the real URL, but every request goes to a local proxy that refuses it
# ---------------------------------------------------------------------------------------------

class _RefusingProxy(socketserver.ThreadingTCPServer):
    """Records the first line of each proxied request (CONNECT host:443 or GET http://...) and answers 502."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.lines: list[str] = []
        lines = self.lines

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                lines.append(self.rfile.readline().decode("latin-1").strip())
                while self.rfile.readline().strip():
                    pass
                self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.mark.parametrize("local", ["empty", "corrupt-archive"])
def test_cli_cifar10_unavailable_exits_1(cli, tmp_path: Path, local: str) -> None:
    proxy = _RefusingProxy()
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        data_dir = tmp_path / "cifar"
        data_dir.mkdir()
        if local == "corrupt-archive":
            (data_dir / CIFAR10.filename).write_bytes(b"\x1f\x8b not really a tarball")
        params = tmp_path / "params.yaml"
        params.write_text("training: {model: tiny, epochs: 1, batch_size: 32, dataset: cifar10}\n")
        proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
        env = {var: proxy_url for var in PROXY_VARS if "no_" not in var.lower()}
        env.update({"no_proxy": "", "NO_PROXY": "", "TUNER_DATA_DIR": str(data_dir)})
        proc = cli("train", "params.yaml", "--dataset", "cifar10", "--data-dir", str(data_dir), env=env,
                   timeout=120)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(data_dir) in lines[0] and FOLDER in lines[0]
    # the download was attempted, and only through the refusing local proxy
    host = urllib.parse.urlparse(CIFAR10.url).hostname
    assert proxy.lines and all(host in line for line in proxy.lines), proxy.lines
    assert not (data_dir / FOLDER).exists()

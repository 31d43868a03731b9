"""Optuna's own storage conformance tests (`optuna.testing.pytest_storages.StorageTestCase`) against
the storage a tuner worker opens (`tuner.storage.database.open_storage` with heartbeats and SQLite's
write-ahead log), on SQLite and on PostgreSQL. Nothing is excluded."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from optuna.testing.pytest_storages import StorageTestCase

from tuner.storage.database import open_storage


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage(request, tmp_path) -> Iterator[object]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'conformance.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    rdb = open_storage(url, heartbeat_interval=60, wal=True)
    try:
        yield rdb
    finally:
        rdb.engine.dispose()


class TestTunerStorage(StorageTestCase):
    """Every case of Optuna's suite, on each backend."""

"""Shared fixtures: real stores on real SQLite files in a temporary directory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from crdt_store import Store

# The throwaway PostgreSQL cluster and its per-test databases (pg_cluster, cloud_db, ...).
pytest_plugins = ["tests.pg_cluster"]

OpenStore = Callable[..., Awaitable[Store]]


async def sync_pair(a: Store, b: Store) -> None:
    """Full anti-entropy both ways through the store's sync seam (what peers do)."""
    for _ in range(2):
        for source, target in ((a, b), (b, a)):
            for name in source.doc_names():
                update = source.diff(name, target.state_vector(name))
                await target.apply_remote(name, update, source.station_id)


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Open stores by station id (``tmp_path/<station>.db``); all are closed at the end."""
    opened: list[Store] = []

    async def _open(station_id: str = "A", **kwargs: object) -> Store:
        path = kwargs.pop("path", tmp_path / f"{station_id}.db")
        kwargs.setdefault("shard_count", 8)
        store = await Store.connect(path, station_id=station_id, **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield _open
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    return await open_store("A")

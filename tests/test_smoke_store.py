"""The store's most basic promise: what was acknowledged is there after a reopen."""

from __future__ import annotations

from pathlib import Path

from crdt_store import NewItem, Store


async def test_checkout_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "station.db"
    async with Store.open(path, station_id="A", shard_count=4) as store:
        item = await store.add_item(NewItem("SPK001", "QSC K10.2 Speaker", qty=8))
        after = await store.checkout(item.id, 2, sheet="JOB-1")
        assert after.stock == 6
    async with Store.open(path, station_id="A", shard_count=4) as store:
        again = await store.item("SPK001")
        assert again.stock == 6
        assert [m.op for m in await store.history("SPK001")] == ["add", "checkout"]

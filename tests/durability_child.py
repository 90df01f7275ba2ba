"""A scanner station under load, for the kill -9 test in ``test_durability.py``.

Run as ``python tests/durability_child.py DB --round N --seed S [--ops N] [--retry FILE]``.
It opens the store, prints ``open {"client_id": ...}``, then runs groups of operations
(adds, checkouts, returns, counts, edits), each group concurrently with ``asyncio.gather``
so one group commit carries several of them. Every operation is tagged with a unique
operator name (``r<round>-<n>``), which the store records in the movements ledger;
checkouts, returns and counts also carry a client operation id, as the CLI sends them.

Before starting an operation it prints ``start {...}``; after the store acknowledged it
(the await returned) it prints ``ack {...}``. Each line is one ``write(2)``, so a SIGKILL
never leaves half a line behind in the pipe. ``--retry FILE`` first retries operations a
killed run started but never saw acknowledged (same tag, same operation id), as a
scanner client does after the daemon restarts: ``ack`` if the store took it (or already
had it), ``refused`` if the store refused it. With ``--ops N`` it stops after N new
operations, closes the store cleanly and prints ``closed``; without, it runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crdt_store import ItemView, NewItem, Store, StoreError

STATION = "dock-1"
SHARDS = 8
MAX_ITEMS = 24


def emit(kind: str, data: dict[str, Any]) -> None:
    os.write(1, f"{kind} {json.dumps(data, separators=(',', ':'))}\n".encode())


def operation(
    store: Store, items: dict[str, ItemView], info: dict[str, Any]
) -> Awaitable[ItemView]:
    """The store call an operation description stands for."""
    tag, op = info["tag"], info["op"]
    if op == "add":
        new = NewItem(info["barcode"], info["name"], kind=info["kind"], qty=info["qty"])
        return store.add_item(new, operator=tag)
    item_id = items[info["barcode"]].id
    if op == "edit":
        return store.edit_item(item_id, {"name": info["name"]}, operator=tag)
    if op == "checkout":
        return store.checkout(
            item_id, info["qty"], sheet=info["sheet"], operator=tag, op_id=info["op_id"]
        )
    if op == "return":
        return store.return_units(item_id, info["qty"], operator=tag, op_id=info["op_id"])
    assert op == "count", op
    return store.count(item_id, info["counted"], operator=tag, op_id=info["op_id"])


@dataclass
class Run:
    store: Store
    rng: random.Random
    round: int
    items: dict[str, ItemView]
    count: int = 0

    def tag(self) -> str:
        self.count += 1
        return f"r{self.round}-{self.count}"

    async def tracked(self, info: dict[str, Any], *, retry: bool = False) -> None:
        try:
            view = await operation(self.store, self.items, info)
        except StoreError as exc:
            if not retry:
                raise
            emit("refused", {"tag": info["tag"], "error": type(exc).__name__})
            return
        self.items[view.barcode] = view
        emit("ack", {"tag": info["tag"], "op": info["op"], "stock": view.stock})

    def plan(self, view: ItemView) -> dict[str, Any]:
        """One operation on an existing item that the store cannot refuse."""
        rng = self.rng
        tag = self.tag()
        choices = ["edit", "count"]
        if view.kind == "bulk":
            choices += ["return"] + (["checkout", "checkout"] if view.stock > 0 else [])
        elif view.status == "in":
            choices.append("checkout")
        elif view.status == "out":
            choices.append("return")
        op = rng.choice(choices)
        info: dict[str, Any] = {"tag": tag, "op": op, "barcode": view.barcode}
        if op == "edit":
            info["name"] = f"{view.barcode} named by {tag}"
            return info
        info["op_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if op == "checkout":
            info["qty"] = 1 if view.kind == "serial" else rng.randint(1, min(view.stock, 5))
            info["sheet"] = f"JOB-{self.round}"
        elif op == "return":
            info["qty"] = 1 if view.kind == "serial" else rng.randint(1, 5)
        elif view.kind == "serial":
            info["counted"] = rng.choice([0, 1])
        else:
            info["counted"] = max(0, view.stock + rng.randint(-3, 3))
        return info

    def plan_add(self) -> dict[str, Any]:
        tag = self.tag()
        barcode = f"R{self.round}X{self.count}"
        serial = self.rng.random() < 0.3
        return {
            "tag": tag,
            "op": "add",
            "barcode": barcode,
            "kind": "serial" if serial else "bulk",
            "qty": 1 if serial else self.rng.randint(0, 40),
            "name": f"{barcode} added by {tag}",
        }

    async def group(self) -> int:
        """Start 1-6 operations on distinct items at once and wait for all of them."""
        size = self.rng.randint(1, 6)
        planned = []
        barcodes = list(self.items)
        self.rng.shuffle(barcodes)
        for _ in range(size):
            if len(self.items) < MAX_ITEMS and (len(barcodes) < 3 or self.rng.random() < 0.15):
                planned.append(self.plan_add())
            elif barcodes:
                planned.append(self.plan(self.items[barcodes.pop()]))
        for info in planned:
            # Printed before the operation can reach the disk: what is present after a
            # crash must be a subset of what was started.
            emit("start", info)
        await asyncio.gather(*(self.tracked(info) for info in planned))
        return len(planned)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db", type=Path)
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--ops", type=int, default=0, help="close cleanly after this many")
    parser.add_argument("--retry", type=Path, help="JSON list of operations to retry")
    parser.add_argument("--compact-after", type=int, default=40)
    args = parser.parse_args()
    store = await Store.connect(
        args.db, station_id=STATION, shard_count=SHARDS, compact_after=args.compact_after
    )
    emit("open", {"client_id": store.client_id})
    items = {view.barcode: view for view in await store.list_items(limit=10_000)}
    run = Run(store, random.Random(args.seed), args.round, items)
    if args.retry is not None:
        retries = json.loads(args.retry.read_text())
        await asyncio.gather(*(run.tracked(info, retry=True) for info in retries))
    done = 0
    while not args.ops or done < args.ops:
        done += await run.group()
    await store.close()
    emit("closed", {"ops": done})


if __name__ == "__main__":
    asyncio.run(main())

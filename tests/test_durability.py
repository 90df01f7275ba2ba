"""Nothing a station acknowledged is lost when its process is killed with SIGKILL.

A real child process (``durability_child.py``) runs a scanner station against a real SQLite
file: adds, checkouts, returns, counts and name edits, several at a time so one group
commit carries several operations. It prints ``start`` before each operation and ``ack``
once the store acknowledged it. The test kills it with SIGKILL at random points (after a
random number of acknowledgements, or a random delay), reopens the file and checks what
an operator would check after the daemon was killed:

- every acknowledged operation is in the item's history, and nothing is there that was
  never started (acked ⊆ present ⊆ started, by the unique operator tag of each operation);
- stock, name and status of every item are exactly what the movements in its history add
  up to, so the documents and the ledger agree (they are written in one commit);
- the query index matches the documents: views, histories, conflicts and alerts are
  identical after forcing a rebuild of the index from the documents;
- the Yjs client id changes after every unclean shutdown (two histories must never share
  one) and stays the same after a clean close;
- a checkout, return or count that a killed run started but never saw acknowledged, and
  that the next run retries with the same operation id (as the CLI does), is applied
  exactly once: either the store already had it, or it applies it now (or refuses it,
  and then it is absent for good).

The child continues on the same file after each kill, with a small ``compact_after`` so
kills also land during compaction. The last round closes cleanly, so by the end every
retried operation has been settled. SIGKILL leaves the kernel's page cache intact: this
proves the order of commit and acknowledgement and that the file is consistent at any
instant, not that ``synchronous=FULL`` reaches the platter (that needs a power-cut rig).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crdt_store import ItemView, Movement, Store

CHILD = Path(__file__).with_name("durability_child.py")
STATION = "dock-1"
SHARDS = 8
#: Rounds that end in a clean close instead of SIGKILL (the rest are killed).
CLEAN_ROUNDS = {3, 7, 10}
ROUNDS = 10
SIGNED = {"add": 1, "checkout": -1, "return": 1, "count": 1, "edit": 0}
#: Operations a client retries with the same operation id after losing the answer.
RETRIED = {"checkout", "return", "count"}


@dataclass
class Journal:
    """What the children said, across every round: operations started (by tag), acknowledged
    and refused."""

    started: dict[str, dict[str, Any]] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)

    def unsettled(self) -> list[dict[str, Any]]:
        """Retryable operations that were neither acknowledged nor refused yet."""
        settled = self.acked | self.refused
        return [
            info
            for tag, info in self.started.items()
            if info["op"] in RETRIED and tag not in settled
        ]


@dataclass(frozen=True, slots=True)
class RoundResult:
    client_id: int
    killed: bool
    in_flight: int


async def run_child(
    path: Path,
    journal: Journal,
    *,
    round_no: int,
    seed: int,
    rng: random.Random,
    clean_ops: int | None,
) -> RoundResult:
    """Run one child; kill it at a random point unless ``clean_ops`` is given."""
    args = [str(CHILD), str(path), "--round", str(round_no), "--seed", str(seed)]
    if clean_ops is not None:
        args += ["--ops", str(clean_ops)]
    if retries := journal.unsettled():
        retry_file = path.with_name(f"retry-{round_no}.json")
        retry_file.write_text(json.dumps(retries))
        args += ["--retry", str(retry_file)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    loop = asyncio.get_running_loop()
    killed = False
    started_here: set[str] = set()

    def kill() -> None:
        nonlocal killed
        if proc.returncode is None and not killed:
            killed = True
            proc.send_signal(signal.SIGKILL)

    by_acks = rng.random() < 0.5
    kill_after_acks = rng.randint(1, 150)
    kill_delay = rng.uniform(0.0, 0.4)
    client_id: int | None = None
    acks = 0
    timers: list[asyncio.TimerHandle] = []
    try:
        async with asyncio.timeout(30):
            # Lines still in the pipe after the kill were written before it: read to EOF.
            while line := await proc.stdout.readline():
                assert line.endswith(b"\n"), f"half a line from the child: {line!r}"
                kind, _, payload = line.decode().partition(" ")
                data = json.loads(payload)
                if kind == "open":
                    client_id = int(data["client_id"])
                    if clean_ops is None:
                        delay = kill_delay if not by_acks else 10.0  # 10 s: a backstop only
                        timers.append(loop.call_later(delay, kill))
                elif kind == "start":
                    assert data["tag"] not in journal.started
                    journal.started[data["tag"]] = data
                    started_here.add(data["tag"])
                elif kind == "refused":
                    assert data["tag"] in journal.started and data["tag"] not in journal.acked
                    journal.refused.add(data["tag"])
                elif kind == "ack":
                    assert data["tag"] in journal.started, "acknowledged before started"
                    assert data["tag"] not in journal.refused
                    journal.acked.add(data["tag"])
                    acks += 1
                    if clean_ops is None and by_acks and acks >= kill_after_acks:
                        kill()
            returncode = await proc.wait()
    finally:
        for timer in timers:
            timer.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = (await proc.stderr.read()).decode(errors="replace")
    if killed:
        assert returncode == -signal.SIGKILL, stderr
    else:
        assert clean_ops is not None, f"child died on its own ({returncode}): {stderr}"
        assert returncode == 0, stderr
    assert client_id is not None, f"child never opened the store: {stderr}"
    # Operations the child had started and not seen acknowledged when it died.
    return RoundResult(client_id, killed, len(started_here - journal.acked))


def expected_item(
    barcode: str, history: list[Movement], journal: Journal
) -> tuple[int, str, str | None]:
    """Stock, name and (serial) status that the movements in ``history`` add up to."""
    stock = 0
    name = ""
    status: str | None = None
    for movement in history:
        started = journal.started[movement.operator]
        assert movement.op == started["op"] and movement.barcode == barcode, movement
        assert movement.id == started.get("op_id", movement.id), "operation id not kept"
        stock += SIGNED[movement.op] * movement.qty
        if movement.op == "add":
            name = started["name"]
            status = "in" if started["kind"] == "serial" else None
        elif movement.op == "edit":
            name = started["name"]
        elif status is not None and movement.op == "checkout":
            status = "out"
        elif status is not None and movement.op == "return":
            status = "in"
        elif status is not None and movement.op == "count":
            status = "in" if started["counted"] == 1 else "lost"
    return stock, name, status


@dataclass(frozen=True, slots=True)
class Visible:
    """Everything the query index answers, to compare before and after a rebuild."""

    items: list[ItemView]
    histories: dict[str, list[Movement]]
    conflicts: list[ItemView]
    alerts: list[Any]


async def visible(store: Store, barcodes: list[str]) -> Visible:
    return Visible(
        items=await store.list_items(limit=10_000, include_deleted=True),
        histories={barcode: await store.history(barcode) for barcode in barcodes},
        conflicts=await store.conflicts(),
        alerts=await store.alerts(),
    )


async def check_after_restart(path: Path, journal: Journal, context: str) -> int:
    """Reopen the file and check it against the journal; returns the client id used."""
    store = await Store.connect(path, station_id=STATION, shard_count=SHARDS)
    client_id = store.client_id
    try:
        added = sorted(tag for tag, info in journal.started.items() if info["op"] == "add")
        barcodes = [journal.started[tag]["barcode"] for tag in added]
        seen = await visible(store, barcodes)
        movements = [m for history in seen.histories.values() for m in history]
        present = {m.operator for m in movements}
        assert len(present) == len(movements), f"a movement was recorded twice ({context})"
        assert len({m.hlc for m in movements}) == len(movements), f"HLC reused ({context})"
        assert journal.acked <= present, (
            f"acknowledged operations lost: {sorted(journal.acked - present)} ({context})"
        )
        assert present <= journal.started.keys(), f"movements never started ({context})"
        assert not present & journal.refused, f"a refused retry was applied ({context})"
        live = {view.barcode: view for view in seen.items}
        assert set(live) == {m.barcode for m in movements if m.op == "add"}, context
        for barcode, view in live.items():
            stock, name, status = expected_item(barcode, seen.histories[barcode], journal)
            assert (view.stock, view.name) == (stock, name), f"{barcode} ({context})"
            if status is not None:
                assert view.status == status, f"{barcode} ({context})"
            assert not view.deleted and not view.conflicts
        assert seen.conflicts == [] and seen.alerts == [], context
    finally:
        await store.close()

    # Force a rebuild of the whole query index from the documents and compare.
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '0' WHERE key = 'index_version'")
    db.close()
    async with Store.open(path, station_id=STATION, shard_count=SHARDS) as store:
        assert store.client_id == client_id, "client id changed after a clean close"
        rebuilt = await visible(store, barcodes)
    assert rebuilt == seen, f"query index differs from the documents ({context})"
    return client_id


async def test_acknowledged_operations_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "station.db"
    seed = int(os.environ.get("INVSYNC_TEST_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    journal = Journal()
    previous_id: int | None = None
    kills = in_flight_kills = 0
    for round_no in range(1, ROUNDS + 1):
        context = f"round {round_no}, INVSYNC_TEST_SEED={seed}"
        clean_ops = rng.randint(10, 60) if round_no in CLEAN_ROUNDS else None
        result = await run_child(
            path,
            journal,
            round_no=round_no,
            seed=rng.randrange(2**32),
            rng=rng,
            clean_ops=clean_ops,
        )
        if previous_id is not None:
            # The last open before this one ended in a clean close.
            assert result.client_id == previous_id, f"client id not reused ({context})"
        client_id = await check_after_restart(path, journal, context)
        if result.killed:
            kills += 1
            in_flight_kills += result.in_flight > 0
            assert client_id != result.client_id, f"client id reused after a crash ({context})"
        else:
            assert client_id == result.client_id, f"client id changed after close ({context})"
        previous_id = client_id
    assert kills == ROUNDS - len(CLEAN_ROUNDS)
    assert journal.unsettled() == [], "a retried operation was never settled"
    # The test means something only if kills landed with operations in flight.
    assert in_flight_kills >= 1, f"no kill hit an operation in flight (seed {seed})"
    assert len(journal.acked) >= 100, f"only {len(journal.acked)} operations acknowledged"

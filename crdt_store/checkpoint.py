"""WAL checkpoints on a connection and thread of their own, off the commit path.

SQLite's automatic checkpoint runs inside the commit that takes the WAL past its limit:
that commit copies pages back into the database file and syncs it on the writer's thread
while every operation of the batch waits for its acknowledgement. Measured with 16
checkout callers at 100k items, that was a third of the writer thread's time. Here a
passive checkpoint runs on its own aiosqlite thread after commits, at most once per
``interval``; it copies pages while the writer goes on committing, and once a checkpoint
has copied everything SQLite starts the WAL over at the next commit.

The writer keeps an automatic checkpoint of its own at ``WRITER_CHECKPOINT_PAGES`` as a
bound: under writes so steady that no passive pass ever catches up, the writer's own
checkpoint finds most pages already copied and lets the WAL start over. Durability does
not depend on any of this: a commit is acknowledged once it is synced in the WAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import aiosqlite

_LOGGER = logging.getLogger(__name__)

#: The writer's own automatic checkpoint, in pages (16 MB at 4 KB pages): the bound on
#: the WAL when the passive checkpoints fall behind.
WRITER_CHECKPOINT_PAGES = 4000
#: A WAL that grew past this (a migration, a large import) is cut back to it when it
#: starts over, instead of keeping its largest size on disk.
WAL_SIZE_LIMIT = 16 * 1024 * 1024
#: Seconds between passive checkpoints while commits keep coming.
CHECKPOINT_INTERVAL = 0.2


async def tune_writer(db: aiosqlite.Connection) -> None:
    """Leave routine checkpoints to :class:`Checkpointer` on the writer connection."""
    await db.execute(f"PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES}")
    await db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")


class Checkpointer:
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` after commits on its own connection."""

    def __init__(self, db: aiosqlite.Connection, interval: float) -> None:
        self._db = db
        self._interval = interval
        self._due = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="store: checkpointer")
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, interval: float = CHECKPOINT_INTERVAL) -> Checkpointer:
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            # The checkpoint syncs the database file as the writer would.
            await db.execute("PRAGMA synchronous = FULL")
        except BaseException:
            await db.close()
            raise
        return cls(db, interval)

    def committed(self) -> None:
        """A commit added pages to the WAL: copy them back soon."""
        self._due.set()

    async def close(self) -> None:
        """Stop checkpointing (a pass under way finishes) and close the connection."""
        if self._closed:
            return
        self._closed = True
        self._task.cancel("store closing")
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._db.close()

    async def _run(self) -> None:
        while True:
            await self._due.wait()
            self._due.clear()
            try:
                # The cursor must be read to the end: a statement left open keeps a read
                # transaction, and the WAL cannot start over while one is open.
                async with self._db.execute("PRAGMA wal_checkpoint(PASSIVE)") as cursor:
                    await cursor.fetchall()
            except aiosqlite.Error as exc:
                # The writer's own checkpoint still bounds the WAL: log and go on.
                _LOGGER.warning("WAL checkpoint failed: %s", exc)
            await asyncio.sleep(self._interval)

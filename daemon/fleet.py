"""The fleet this station belongs to, as far as peer sync needs it: the fleet id.

Stations only sync with stations that announce the same fleet id. A station that belongs
to no fleet yet starts a new one-station fleet with a random id, kept in
``<data dir>/fleet.id``. (Fleet security replaces this file with the fleet CA: the id
becomes a hash of the CA key, and joining a fleet needs an enrollment token.)
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

FLEET_FILE = "fleet.id"
_FLEET_RE = re.compile(r"^[A-Z2-7]{16}$")


class FleetFileError(Exception):
    pass


def load_or_create_fleet_id(data_dir: Path) -> str:
    path = data_dir / FLEET_FILE
    if not path.exists():
        fleet_id = base64.b32encode(os.urandom(10)).decode("ascii")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(fleet_id + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    fleet_id = path.read_text().strip()
    if not _FLEET_RE.match(fleet_id):
        raise FleetFileError(f"{path} does not hold a fleet id (16 base32 characters)")
    return fleet_id

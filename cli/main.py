"""``invsync``: the command line of a station.

The commands arrive with the daemon's control API; until then the CLI only reports its
version.
"""

from __future__ import annotations

from importlib.metadata import version

import click


@click.group()
@click.version_option(version("invsync"), prog_name="invsync")
def main() -> None:
    """invsync: local-first inventory sync for warehouse scanner stations."""

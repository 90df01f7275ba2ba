"""The ``invsync`` command line against a real ``invsyncd``, as an operator uses it.

Commands run in-process through click's ``CliRunner`` (fast, and stdin can be scripted)
against one real daemon per module, started by ``tests/daemon_harness.py``. Tests share
that daemon, so each one works on barcodes of its own. What is checked is what a person
or a script sees: the sentence printed, the exit code (0 ok, 1 failed, 2 usage, 3 daemon
not reachable), the ``--json`` documents, and the state of the inventory afterwards.
The control API's handling of bad requests is tested over the Unix socket directly.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

import cli.main as cli_main
from cli.main import CSV_COLUMNS, export_row, main
from daemon.catalog import parse_rows
from tests.daemon_harness import Daemon, running_daemon, short_dir

DATA = Path(__file__).with_name("data")
ITEM_KEYS = {
    "id",
    "barcode",
    "name",
    "kind",
    "stock",
    "status",
    "sheet",
    "location",
    "category",
    "notes",
    "deleted",
    "conflicts",
}
STATION_NAME = "cli-dock"


class Cli:
    """``invsync --socket PATH ...`` run in-process, with assertions on the outcome."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.runner = CliRunner()

    def __call__(self, *args: str, stdin: str | None = None) -> Result:
        result = self.runner.invoke(
            main, ["--socket", str(self.socket_path), *args], input=stdin, prog_name="invsync"
        )
        # A crash also exits 1 under CliRunner; only a deliberate exit is an outcome.
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"invsync {' '.join(args)} crashed") from result.exception
        return result

    def ok(self, *args: str, stdin: str | None = None) -> Result:
        result = self(*args, stdin=stdin)
        assert result.exit_code == 0, (args, result.stdout, result.stderr)
        return result

    def fails(self, *args: str, code: int = 1) -> Result:
        result = self(*args)
        assert result.exit_code == code, (args, result.stdout, result.stderr)
        return result

    def json(self, *args: str) -> dict[str, Any]:
        data = json.loads(self.ok("--json", *args).stdout)
        assert isinstance(data, dict)
        return data

    def error(self, *args: str) -> dict[str, Any]:
        """The ``--json`` error document of a command that fails with exit 1."""
        result = self.fails("--json", *args)
        data = json.loads(result.stdout)
        assert isinstance(data, dict) and set(data) == {"error"}, data
        error: dict[str, Any] = data["error"]
        assert isinstance(error["message"], str) and error["message"]
        return error

    def item(self, key: str) -> dict[str, Any]:
        (found,) = self.json("item", "show", key)["items"]
        assert isinstance(found, dict)
        return found

    def add(self, barcode: str, name: str, *options: str) -> dict[str, Any]:
        added = self.json("item", "add", barcode, "--name", name, *options)["item"]
        assert isinstance(added, dict)
        return added


@pytest.fixture(scope="module")
def station() -> Iterator[Daemon]:
    with running_daemon(name=STATION_NAME) as daemon:
        yield daemon


@pytest.fixture
def invsync(station: Daemon) -> Cli:
    return Cli(station.socket_path)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory short enough for a Unix socket path (pytest's tmp_path may be too long)."""
    path = short_dir("invcli")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- help and reachability


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _command_paths(command, (*prefix, name))


@pytest.mark.parametrize("path", [(), *_command_paths(main)], ids=lambda p: " ".join(p) or "-")
def test_help_of_every_command(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"], prog_name="invsync")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: {' '.join(('invsync', *path))} ")


def test_top_level_help_lists_the_documented_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in (
        "status",
        "peers",
        "sync",
        "item",
        "scan",
        "checkout",
        "return",
        "count",
        "history",
        "conflicts",
        "import",
        "export",
        "fleet",
        "cloud",
    ):
        assert f"\n  {command} " in result.stdout, command


@pytest.mark.parametrize(
    "args",
    [("status",), ("--json", "status"), ("item", "show", "SPK001"), ("checkout", "SPK001")],
    ids=" ".join,
)
def test_no_daemon_exits_3_saying_how_to_start_it(short_tmp: Path, args: tuple[str, ...]) -> None:
    missing = short_tmp / "invsyncd.sock"
    result = Cli(missing)(*args)
    assert result.exit_code == 3
    assert str(missing) in result.stderr
    assert "invsyncd" in result.stderr
    assert result.stdout == ""


def test_stale_socket_of_a_crashed_daemon_exits_3(short_tmp: Path) -> None:
    stale = short_tmp / "invsyncd.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()  # the file stays, nobody listens: what a kill -9 leaves behind
    result = Cli(stale)("status")
    assert result.exit_code == 3
    assert "invsyncd" in result.stderr


@pytest.mark.parametrize("problem", ["not-a-directory", "path-too-long"])
def test_unusable_socket_path_exits_3_not_a_traceback(short_tmp: Path, problem: str) -> None:
    if problem == "not-a-directory":
        (short_tmp / "file").write_text("")
        socket_path = short_tmp / "file" / "invsyncd.sock"
    else:
        socket_path = short_tmp / ("x" * 120) / "invsyncd.sock"
    result = Cli(socket_path)("status")
    assert result.exit_code == 3
    assert "cannot reach invsyncd" in result.stderr


def test_scan_loop_with_a_wrong_socket_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, short_tmp: Path
) -> None:
    """Waiting is for a daemon that restarts; a daemon never reached is a wrong path."""
    monkeypatch.setattr(cli_main, "SCAN_RETRY_SECONDS", 30.0)
    started = time.monotonic()
    result = Cli(short_tmp / "invsyncd.sock")("scan", stdin="SPK001\nSPK002\n")
    assert result.exit_code == 3
    assert "retrying" not in result.stderr
    assert "invsyncd" in result.stderr
    assert time.monotonic() - started < 10


def test_socket_from_the_environment(station: Daemon) -> None:
    result = CliRunner().invoke(
        main, ["--json", "status"], env={"INVSYNC_SOCKET": str(station.socket_path)}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["station"]["name"] == STATION_NAME


def test_the_installed_executable_runs_a_piped_scan_loop(station: Daemon, invsync: Cli) -> None:
    invsync.add("EXE-1", "Piped Speaker", "--qty", "3")
    done = station.cli("scan", "--mode", "checkout", stdin="EXE-1\nEXE-NOPE\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "Checked out 1 × Piped Speaker (EXE-1): 2 left",
        "EXE-NOPE: not found",
    ]
    assert "2 scans: 1 ok, 1 not found, 0 failed" in done.stderr


# ---------------------------------------------------------------------- status, fleet, cloud


def test_status_human_and_json(invsync: Cli) -> None:
    human = invsync.ok("status").stdout
    assert f"Station   {STATION_NAME} (" in human
    assert "Cloud     not configured" in human
    assert "Peers     0 connected of 0 known" in human

    before = invsync.json("status")
    assert {"station", "items", "conflicts", "alerts", "peers", "cloud", "clock_warnings"} <= set(
        before
    )
    assert before["station"]["name"] == STATION_NAME
    assert before["station"]["id"] == invsync.ok("fleet", "id").stdout.strip()
    assert before["conflicts"] == 0 and before["alerts"] == 0
    assert before["clock_warnings"] == []
    assert (before["peers"]["connected"], before["peers"]["known"]) == (0, 0)
    assert before["cloud"] == {"configured": False}

    invsync.add("STA-1", "Status Counter")
    assert invsync.json("status")["items"] == before["items"] + 1


def test_status_item_count_drops_when_an_item_is_removed(invsync: Cli) -> None:
    invsync.add("STA-RM", "Removed Again")
    before = invsync.json("status")["items"]
    invsync.ok("item", "rm", "STA-RM")
    assert invsync.json("status")["items"] == before - 1


def test_fleet_id_and_members_show_this_station(invsync: Cli) -> None:
    station_id = invsync.ok("fleet", "id").stdout.strip()
    assert station_id
    fleet = invsync.json("fleet", "id")
    assert (fleet["station_id"], fleet["name"]) == (station_id, STATION_NAME)
    assert fleet["holds_ca"] is True  # a lone station founds its own fleet
    assert len(fleet["fleet_id"]) == 16 and fleet["fleet_id"] != station_id

    rows = invsync.ok("fleet", "members").stdout.splitlines()
    assert rows[0].split() == ["STATION", "NAME", "ENROLLED", "LAST", "SEEN", "REVOKED"]
    assert [station_id, "*", STATION_NAME] == rows[1].split()[:3]
    (member,) = invsync.json("fleet", "members")["members"]
    assert (member["station_id"], member["name"], member["revoked"]) == (
        station_id,
        STATION_NAME,
        False,
    )


def test_fleet_commands_refuse_bad_input_clearly(invsync: Cli) -> None:
    assert invsync.error("fleet", "join", "NOT-A-REAL-TOKEN")["code"] == "bad_token"
    assert "not an invsync join token" in invsync.fails("fleet", "join", "x").stderr
    assert invsync.error("fleet", "revoke", "ABCDEFGHIJKLMNOP")["code"] == "not_found"
    assert invsync.error("fleet", "invite", "--expires", "soon")["code"] == "invalid"
    assert invsync.error("fleet", "invite", "--expires", "30d")["code"] == "invalid"
    own = invsync.ok("fleet", "id").stdout.strip()
    assert invsync.error("fleet", "revoke", own)["code"] == "invalid"


def test_fleet_invite_prints_the_token_and_its_short_form(invsync: Cli) -> None:
    text = invsync.ok("fleet", "invite", "--expires", "2h").stdout
    data = invsync.json("fleet", "invite")
    assert data["token"].startswith("invsync-join:1:") and data["short"].startswith("INV1")
    assert data["expires_at"] > time.time() + 800
    assert "invsync-join:1:" in text and "INV1" in text and "fleet join" in text


def test_cloud_status_says_not_configured(invsync: Cli) -> None:
    assert invsync.ok("cloud", "status").stdout.startswith("Cloud bridge not configured")
    assert invsync.json("cloud", "status") == {"configured": False}


@pytest.mark.parametrize("args", [("cloud", "push"), ("cloud", "pull")], ids=" ".join)
def test_cloud_push_and_pull_without_a_bridge_say_how_to_set_one_up(
    invsync: Cli, args: tuple[str, ...]
) -> None:
    result = invsync.fails(*args)
    assert "INVSYNC_CLOUD_URL" in result.stderr
    assert invsync.error(*args)["code"] == "not_configured"


def test_peers_and_sync_on_a_station_alone(invsync: Cli) -> None:
    assert invsync.ok("peers").stdout == "No peers known yet.\n"
    assert invsync.json("peers") == {"peers": [], "refused": []}
    assert invsync.ok("sync").stdout == "No peers connected; nothing to sync with.\n"
    assert invsync.json("sync") == {"peers": [], "in_sync": True}


# ---------------------------------------------------------------------- items


def test_item_add_bulk_with_every_field(invsync: Cli) -> None:
    result = invsync.ok(
        "item", "add", "ADD-SPK", "--name", "QSC K10.2 Speaker", "--qty", "8",
        "--location", "Aisle 3", "--category", "Audio", "--notes", "pairs only",
    )  # fmt: skip
    assert result.stdout == "Added QSC K10.2 Speaker (ADD-SPK): 8 in stock\n"
    shown = invsync.item("ADD-SPK")
    assert set(shown) >= ITEM_KEYS
    assert (shown["kind"], shown["stock"], shown["location"], shown["category"]) == (
        "bulk",
        8,
        "Aisle 3",
        "Audio",
    )
    assert shown["notes"] == "pairs only"


def test_item_add_json_shape(invsync: Cli) -> None:
    data = invsync.json("item", "add", "ADD-JSON", "--name", "Sub 18in", "--qty", "2")
    assert set(data) == {"item"}
    added = data["item"]
    assert set(added) >= ITEM_KEYS
    assert added["id"] and added["barcode"] == "ADD-JSON" and added["name"] == "Sub 18in"
    assert (added["kind"], added["stock"], added["status"], added["sheet"]) == (
        "bulk",
        2,
        "in",
        None,
    )
    assert (added["location"], added["category"], added["notes"]) == ("", "", "")
    assert added["deleted"] is False and added["conflicts"] == []


def test_item_add_serial_unit(invsync: Cli) -> None:
    added = invsync.add("ADD-SER", "Yamaha QL5 Console", "--serial", "--location", "Cage")
    assert (added["kind"], added["stock"], added["status"]) == ("serial", 1, "in")
    assert "status    in" in invsync.ok("item", "show", "ADD-SER").stdout


def test_item_add_duplicate_barcode_is_refused(invsync: Cli) -> None:
    invsync.add("DUP-1", "Original Name", "--qty", "4")
    result = invsync.fails("item", "add", "DUP-1", "--name", "Impostor")
    assert "DUP-1" in result.stderr and "already exists" in result.stderr
    assert invsync.error("item", "add", "DUP-1", "--name", "Impostor")["code"] == "exists"
    kept = invsync.item("DUP-1")
    assert (kept["name"], kept["stock"]) == ("Original Name", 4)


@pytest.mark.parametrize(
    ("barcode", "options", "field"),
    [
        ("BAD 1", ("--name", "Space In Barcode"), "barcode"),
        ("BAD-NAME", ("--name", "   "), "name"),
        ("BAD-NEG", ("--name", "Negative", "--qty", "-1"), "qty"),
        ("BAD-HUGE", ("--name", "Absurd", "--qty", "2000000000"), "qty"),
        ("BAD-SER", ("--name", "Serial Three", "--serial", "--qty", "3"), "qty"),
        ("BAD-LOC", ("--name", "Long Location", "--location", "L" * 101), "location"),
        ("BAD-NOTE", ("--name", "Bell", "--notes", "ding\x07"), "notes"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_item_add_invalid_input_names_the_field(
    invsync: Cli, barcode: str, options: tuple[str, ...], field: str
) -> None:
    result = invsync.fails("item", "add", barcode, *options)
    assert result.stderr.startswith(f"invsync: invalid {field} ")
    assert invsync.error("item", "add", barcode, *options)["field"] == field
    if field != "barcode":
        assert invsync.error("item", "show", barcode)["code"] == "not_found"


def test_item_add_non_numeric_qty_is_a_usage_error(invsync: Cli) -> None:
    result = invsync.fails("item", "add", "BAD-ABC", "--name", "Letters", "--qty", "abc", code=2)
    assert "--qty" in result.stderr
    assert invsync.error("item", "show", "BAD-ABC")["code"] == "not_found"


def test_item_show_by_barcode_and_by_id(invsync: Cli) -> None:
    added = invsync.add("SHOW-1", "Shure SM58", "--qty", "12", "--location", "Drawer 4")
    human = invsync.ok("item", "show", "SHOW-1").stdout.splitlines()
    assert human[0] == "Shure SM58"
    assert "  barcode   SHOW-1" in human
    assert f"  id        {added['id']}" in human
    assert "  stock     12" in human
    assert "  location  Drawer 4" in human

    by_id = invsync.json("item", "show", added["id"])
    assert by_id == {"items": [added]}


def test_item_show_unknown_barcode_fails(invsync: Cli) -> None:
    result = invsync.fails("item", "show", "SHOW-NOPE")
    assert "no item" in result.stderr and "SHOW-NOPE" in result.stderr
    assert invsync.error("item", "show", "SHOW-NOPE")["code"] == "not_found"
    unknown_id = "01a21c7b-0000-7000-8000-000000000000"
    assert invsync.error("item", "show", unknown_id)["code"] == "not_found"


def test_item_list_search_limit_offset(invsync: Cli) -> None:
    for barcode, name in (
        ("LST-3", "Zulu Lstok"),
        ("LST-1", "Alpha Lstok"),
        ("LST-2", "Mike Lstok"),
    ):
        invsync.add(barcode, name, "--location", "Rack LSTOK")
    listed = invsync.json("item", "list", "--search", "lstok")
    assert set(listed) == {"items"}
    assert [i["name"] for i in listed["items"]] == ["Alpha Lstok", "Mike Lstok", "Zulu Lstok"]
    assert all(set(i) >= ITEM_KEYS for i in listed["items"])

    limited = invsync.json("item", "list", "--search", "lstok", "--limit", "2")["items"]
    assert [i["barcode"] for i in limited] == ["LST-1", "LST-2"]
    rest = invsync.json("item", "list", "--search", "lstok", "--offset", "2")["items"]
    assert [i["barcode"] for i in rest] == ["LST-3"]

    table = invsync.ok("item", "list", "--search", "lstok").stdout.splitlines()
    assert table[0].split()[:3] == ["BARCODE", "NAME", "KIND"]
    assert [row.split()[0] for row in table[1:]] == ["LST-1", "LST-2", "LST-3"]

    assert invsync.ok("item", "list", "--search", "no-such-lstok").stdout == "No items.\n"
    assert "--limit" in invsync.fails("item", "list", "--limit", "0", code=2).stderr


def test_item_edit_each_field(invsync: Cli) -> None:
    invsync.add("EDT-1", "Old Name", "--qty", "3")
    result = invsync.ok(
        "item", "edit", "EDT-1", "--name", "New Name", "--location", "Bay 9",
        "--category", "Video", "--notes", "handle with care",
    )  # fmt: skip
    assert result.stdout == "Updated New Name (EDT-1): category, location, name, notes\n"
    edited = invsync.item("EDT-1")
    assert (edited["name"], edited["location"], edited["category"], edited["notes"]) == (
        "New Name",
        "Bay 9",
        "Video",
        "handle with care",
    )
    assert edited["stock"] == 3

    moved = invsync.json("item", "edit", "EDT-1", "--barcode", "EDT-1B")["item"]
    assert moved["barcode"] == "EDT-1B" and moved["id"] == edited["id"]
    assert invsync.error("item", "show", "EDT-1")["code"] == "not_found"
    assert invsync.item("EDT-1B")["name"] == "New Name"

    invsync.add("EDT-SER", "Projector", "--serial")
    assert invsync.ok("item", "edit", "EDT-SER", "--status", "repair").stdout == (
        "Updated Projector (EDT-SER): status\n"
    )
    assert invsync.item("EDT-SER")["status"] == "repair"


def test_item_edit_without_fields_is_a_usage_error(invsync: Cli) -> None:
    invsync.add("EDT-NONE", "Untouched")
    result = invsync.fails("item", "edit", "EDT-NONE", code=2)
    assert "at least one field" in result.stderr


def test_item_edit_bad_values_are_refused(invsync: Cli) -> None:
    before = invsync.add("EDT-BAD", "Stays The Same", "--location", "Shelf 1")
    assert invsync.error("item", "edit", "EDT-BAD", "--name", "")["field"] == "name"
    assert invsync.error("item", "edit", "EDT-BAD", "--barcode", "has space")["field"] == "barcode"
    result = invsync.fails("item", "edit", "EDT-BAD", "--status", "repair")
    assert "only serialized units have a status" in result.stderr
    assert (
        "--status" in invsync.fails("item", "edit", "EDT-BAD", "--status", "broken", code=2).stderr
    )
    assert invsync.error("item", "edit", "EDT-NOPE", "--name", "X")["code"] == "not_found"
    after = invsync.item("EDT-BAD")
    assert (after["name"], after["location"], after["barcode"]) == (
        before["name"],
        before["location"],
        "EDT-BAD",
    )


def test_item_edit_to_a_barcode_in_use_is_refused(invsync: Cli) -> None:
    invsync.add("EDT-TAKEN", "First")
    invsync.add("EDT-OTHER", "Second")
    result = invsync.fails("item", "edit", "EDT-OTHER", "--barcode", "EDT-TAKEN")
    assert "already exists" in result.stderr
    assert invsync.item("EDT-TAKEN")["name"] == "First"
    assert invsync.item("EDT-OTHER")["name"] == "Second"
    # Re-stating an item's own barcode is not a clash.
    assert invsync.json("item", "edit", "EDT-OTHER", "--barcode", "EDT-OTHER", "--name", "2nd")


def test_item_rm_hides_the_item_but_keeps_it_listed_as_deleted(invsync: Cli) -> None:
    invsync.add("RM-1", "Broken Stand", "--qty", "2")
    assert invsync.ok("item", "rm", "RM-1").stdout == "Deleted Broken Stand (RM-1)\n"
    assert "no item" in invsync.fails("item", "show", "RM-1").stderr
    assert invsync.json("item", "list", "--search", "RM-1")["items"] == []
    (gone,) = invsync.json("item", "list", "--search", "RM-1", "--deleted")["items"]
    assert gone["barcode"] == "RM-1" and gone["deleted"] is True
    assert invsync.error("item", "rm", "RM-1")["code"] == "not_found"
    ops = [m["op"] for m in invsync.json("history", "RM-1")["movements"]]
    assert ops == ["add", "delete"]


# ---------------------------------------------------------------------- stock


def test_checkout_return_count_of_bulk_stock(invsync: Cli) -> None:
    invsync.add("STK-SPK", "QSC K10.2 Speaker", "--qty", "8")
    out = invsync.ok("checkout", "STK-SPK", "--qty", "2", "--sheet", "JOB-1042")
    assert out.stdout == "Checked out 2 × QSC K10.2 Speaker (STK-SPK): 6 left\n"
    back = invsync.ok("return", "STK-SPK")
    assert back.stdout == "Returned 1 × QSC K10.2 Speaker (STK-SPK): 7 in stock\n"
    counted = invsync.ok("count", "STK-SPK", "10")
    assert counted.stdout == "Counted 10 × QSC K10.2 Speaker (STK-SPK): +3\n"
    assert invsync.ok("count", "STK-SPK", "4").stdout.endswith(": -6\n")

    checkout = invsync.json("checkout", "STK-SPK", "--qty", "3")
    assert checkout["qty"] == 3 and checkout["item"]["stock"] == 1
    returned = invsync.json("return", "STK-SPK", "--qty", "2")
    assert returned["qty"] == 2 and returned["item"]["stock"] == 3
    recount = invsync.json("count", "STK-SPK", "3")
    assert recount["change"] == 0 and recount["item"]["stock"] == 3


def test_checkout_more_than_in_stock_is_refused(invsync: Cli) -> None:
    invsync.add("STK-FEW", "Wedge Monitor", "--qty", "3")
    result = invsync.fails("checkout", "STK-FEW", "--qty", "4")
    assert "only 3 in stock" in result.stderr
    assert invsync.error("checkout", "STK-FEW", "--qty", "4")["code"] == "insufficient_stock"
    assert invsync.item("STK-FEW")["stock"] == 3


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("checkout", "STK-QTY", "--qty", "0"), "qty"),
        (("checkout", "STK-QTY", "--qty", "-1"), "qty"),
        (("checkout", "STK-QTY", "--qty", "99999999"), "qty"),
        (("return", "STK-QTY", "--qty", "-5"), "qty"),
        (("return", "STK-QTY", "--qty", "2000000"), "qty"),
        (("count", "STK-QTY", "--", "-3"), "counted"),
        (("count", "STK-QTY", "2000000000"), "counted"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_negative_or_absurd_quantities_are_refused(
    invsync: Cli, args: tuple[str, ...], field: str
) -> None:
    if invsync("item", "show", "STK-QTY").exit_code:
        invsync.add("STK-QTY", "Cable Ramp", "--qty", "5")
    result = invsync.fails(*args)
    assert result.stderr.startswith(f"invsync: invalid {field} ")
    assert invsync.error(*args)["field"] == field
    assert invsync.item("STK-QTY")["stock"] == 5


def test_stock_commands_on_unknown_barcode_fail(invsync: Cli) -> None:
    for args in (("checkout", "STK-NOPE"), ("return", "STK-NOPE"), ("count", "STK-NOPE", "1")):
        assert "no item" in invsync.fails(*args).stderr
        assert invsync.error(*args)["code"] == "not_found"


def test_serial_unit_checkout_return_count(invsync: Cli) -> None:
    invsync.add("SER-MIX", "Allen & Heath SQ5", "--serial")
    out = invsync.ok("checkout", "SER-MIX", "--sheet", "JOB-7")
    assert out.stdout == "Checked out Allen & Heath SQ5 (SER-MIX) to sheet JOB-7\n"
    assert "  status    out (sheet JOB-7)" in invsync.ok("item", "show", "SER-MIX").stdout

    again = invsync.fails("checkout", "SER-MIX", "--sheet", "JOB-8")
    assert "out on sheet JOB-7" in again.stderr
    assert invsync.error("checkout", "SER-MIX")["code"] == "wrong_state"

    assert invsync.ok("return", "SER-MIX").stdout == "Returned Allen & Heath SQ5 (SER-MIX): in\n"
    assert "already in" in invsync.fails("return", "SER-MIX").stderr
    assert invsync.error("checkout", "SER-MIX", "--qty", "2")["field"] == "qty"

    lost = invsync.json("count", "SER-MIX", "0")
    assert lost["change"] == -1 and lost["item"]["status"] == "lost"
    assert invsync.error("count", "SER-MIX", "2")["field"] == "counted"
    found = invsync.ok("count", "SER-MIX", "1")
    assert found.stdout == "Counted 1 × Allen & Heath SQ5 (SER-MIX): +1\n"
    final = invsync.item("SER-MIX")
    assert (final["status"], final["stock"], final["sheet"]) == ("in", 1, None)


def test_history_lists_movements_oldest_first(invsync: Cli) -> None:
    invsync.ok("--operator", "alice", "item", "add", "HIS-1", "--name", "Truss 2m", "--qty", "8")
    invsync.ok("--operator", "alice", "checkout", "HIS-1", "--qty", "2", "--sheet", "JOB-9")
    invsync.ok("--operator", "bob", "return", "HIS-1", "--qty", "1", "--sheet", "JOB-9")
    invsync.ok("--operator", "bob", "count", "HIS-1", "10")

    movements = invsync.json("history", "HIS-1")["movements"]
    assert [(m["op"], m["qty"], m["sheet"], m["operator"]) for m in movements] == [
        ("add", 8, None, "alice"),
        ("checkout", 2, "JOB-9", "alice"),
        ("return", 1, "JOB-9", "bob"),
        ("count", 3, None, "bob"),
    ]
    hlcs = [m["hlc"] for m in movements]
    assert hlcs == sorted(hlcs)
    station_id = invsync.ok("fleet", "id").stdout.strip()
    assert {m["station"] for m in movements} == {station_id}

    table = invsync.ok("history", "HIS-1").stdout.splitlines()
    assert table[0].split() == ["TIME", "(UTC)", "STATION", "OPERATOR", "OP", "QTY", "SHEET"]
    rows = [line.split()[2:] for line in table[1:]]
    assert rows == [
        [station_id, "alice", "add", "8"],
        [station_id, "alice", "checkout", "2", "JOB-9"],
        [station_id, "bob", "return", "1", "JOB-9"],
        [station_id, "bob", "count", "3"],
    ]
    assert invsync.error("history", "HIS-NOPE")["code"] == "not_found"


# ---------------------------------------------------------------------- scanning


def test_scan_one_barcode_in_each_mode(invsync: Cli) -> None:
    invsync.add("SCN-1", "Par Can", "--qty", "8")
    invsync.add("SCN-S", "Hazer", "--serial")
    assert invsync.ok("scan", "SCN-1").stdout == "Par Can (SCN-1): 8 in stock\n"
    assert invsync.ok("scan", "SCN-S").stdout == "Hazer (SCN-S): in\n"
    out = invsync.ok("scan", "SCN-1", "--mode", "checkout", "--qty", "3", "--sheet", "JOB-3")
    assert out.stdout == "Checked out 3 × Par Can (SCN-1): 5 left\n"
    back = invsync.ok("scan", "SCN-1", "--mode", "return")
    assert back.stdout == "Returned 1 × Par Can (SCN-1): 6 in stock\n"
    counted = invsync.ok("scan", "SCN-1", "--mode", "count", "--qty", "7")
    assert counted.stdout == "Counted 7 × Par Can (SCN-1): +1\n"
    assert invsync.ok("scan", "SCN-S", "--mode", "checkout").stdout == "Checked out Hazer (SCN-S)\n"

    missing = invsync.fails("scan", "SCN-NOPE")
    assert missing.stdout == "SCN-NOPE: not found\n"
    refused = invsync.fails("scan", "SCN-1", "--mode", "checkout", "--qty", "50")
    assert "only 7 in stock" in refused.stdout

    single = invsync.json("scan", "SCN-1")
    assert single["barcode"] == "SCN-1" and single["ok"] is True
    assert [i["stock"] for i in single["items"]] == [7]
    assert "summary" not in single


def test_scan_loop_reads_stdin_and_carries_on_after_unknown_barcodes(invsync: Cli) -> None:
    invsync.add("LOOP-A", "Mic Stand", "--qty", "4")
    invsync.add("LOOP-B", "Wireless Mic", "--serial")
    result = invsync.ok("scan", stdin="LOOP-A\n\n  \nLOOP-B\nLOOP-NOPE\nLOOP-A\n")
    assert result.stdout.splitlines() == [
        "Mic Stand (LOOP-A): 4 in stock",
        "Wireless Mic (LOOP-B): in",
        "LOOP-NOPE: not found",
        "Mic Stand (LOOP-A): 4 in stock",
    ]
    assert result.stderr.strip().splitlines()[-1] == "4 scans: 3 ok, 1 not found, 0 failed"


def test_scan_loop_checkout_counts_refusals_and_keeps_going(invsync: Cli) -> None:
    invsync.add("LOOP-C", "DI Box", "--qty", "2")
    result = invsync.ok(
        "scan", "--mode", "checkout", "--sheet", "JOB-55", stdin="LOOP-C\nLOOP-C\nLOOP-C\nNOPE-C\n"
    )
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        "Checked out 1 × DI Box (LOOP-C): 1 left",
        "Checked out 1 × DI Box (LOOP-C): 0 left",
    ]
    assert lines[2].startswith("LOOP-C: ") and "only 0 in stock" in lines[2]
    assert lines[3] == "NOPE-C: not found"
    assert "4 scans: 2 ok, 1 not found, 1 failed" in result.stderr
    assert invsync.item("LOOP-C")["stock"] == 0
    sheets = [m["sheet"] for m in invsync.json("history", "LOOP-C")["movements"][1:]]
    assert sheets == ["JOB-55", "JOB-55"]


def test_scan_loop_json_prints_one_object_per_line_and_a_summary(invsync: Cli) -> None:
    invsync.add("LOOP-J", "Gaffer Tape", "--qty", "30")
    result = invsync.ok("--json", "scan", "--mode", "checkout", stdin="LOOP-J\nLOOP-JX\nLOOP-J\n")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 4
    assert [line.get("ok") for line in lines[:3]] == [True, False, True]
    assert [line["item"]["stock"] for line in (lines[0], lines[2])] == [29, 28]
    assert lines[0]["barcode"] == "LOOP-J" and lines[0]["qty"] == 1
    assert lines[1] == {"barcode": "LOOP-JX", "ok": False, "error": "not_found"}
    assert lines[3] == {"summary": {"scans": 3, "ok": 2, "not_found": 1, "failed": 0}}


# ---------------------------------------------------------------------- conflicts


def test_no_conflicts_on_a_single_station(invsync: Cli) -> None:
    assert invsync.ok("conflicts").stdout.startswith("No conflicts")
    assert invsync.json("conflicts") == {"conflicts": [], "alerts": []}


def test_resolving_a_field_without_conflict_is_refused(invsync: Cli) -> None:
    invsync.add("CNF-1", "Fog Machine", "--location", "Bay 1")
    result = invsync.fails("conflicts", "resolve", "CNF-1", "location", "Bay 2")
    assert "no conflict" in result.stderr
    assert invsync.error("conflicts", "resolve", "CNF-1", "name", "X")["code"] == "no_conflict"
    assert invsync.item("CNF-1")["location"] == "Bay 1"
    assert invsync.error("conflicts", "resolve", "CNF-NOPE", "name", "X")["code"] == "not_found"


# ---------------------------------------------------------------------- import and export


def test_import_good_catalog(invsync: Cli) -> None:
    result = invsync.ok("import", str(DATA / "catalog_good.csv"))
    assert result.stdout == "Imported 3 items; 0 already present; 0 rows with errors skipped\n"
    cable = invsync.item("IMP-XLR10")
    assert (cable["name"], cable["stock"], cable["location"], cable["category"]) == (
        "Cable XLR 10m",
        40,
        "B2",
        "Cables",
    )
    assert cable["notes"] == "black, 3-pin"
    head = invsync.item("IMP-MH01")
    assert (head["kind"], head["stock"], head["status"]) == ("serial", 1, "in")
    dmx = invsync.item("IMP-DMX5")
    assert (dmx["name"], dmx["notes"]) == ('DMX Cable 5m "short"', "spare\ncoil")


def test_import_reports_broken_rows_by_line_and_keeps_the_good_ones(invsync: Cli) -> None:
    invsync.add("BRK-PRESENT", "Present Before Import", "--qty", "1")
    result = invsync.fails("import", str(DATA / "catalog_broken.csv"))
    assert result.stdout.splitlines() == [
        "line 3: invalid qty 'lots': must be a whole number",
        "line 4: invalid name '': must not be empty",
        "line 5: expected 7 columns, found 3",
        "line 6: barcode BRK-001 repeats line 2",
        "Imported 2 items; 1 already present; 4 rows with errors skipped",
    ]
    assert invsync.item("BRK-001")["name"] == "Good Row One"
    assert invsync.item("BRK-005")["kind"] == "serial"
    for barcode in ("BRK-002", "BRK-003", "BRK-004"):
        assert invsync.error("item", "show", barcode)["code"] == "not_found"
    present = invsync.item("BRK-PRESENT")
    assert (present["name"], present["stock"]) == ("Present Before Import", 1)


def test_import_skips_barcodes_already_present(invsync: Cli, tmp_path: Path) -> None:
    invsync.add("IMS-OLD", "Kept As Is", "--qty", "7")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("Barcode,Name,Qty\nIMS-OLD,Overwritten?,1\nIMS-NEW,Fresh Item,3\n")
    data = invsync.json("import", str(catalog))
    assert data == {
        "imported": 1,
        "skipped": [{"line": 2, "barcode": "IMS-OLD", "reason": "exists"}],
        "errors": [],
    }
    old = invsync.item("IMS-OLD")
    assert (old["name"], old["stock"]) == ("Kept As Is", 7)
    assert invsync.item("IMS-NEW")["stock"] == 3


def test_import_with_an_unknown_column_imports_nothing(invsync: Cli, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("barcode,name,colour\nIMU-1,Red Thing,red\nIMU-2,Blue Thing,blue\n")
    result = invsync("import", str(catalog))
    assert result.exit_code in (1, 2)
    assert "colour" in result.stderr and "columns are" in result.stderr
    for barcode in ("IMU-1", "IMU-2"):
        assert invsync.error("item", "show", barcode)["code"] == "not_found"

    header_only = tmp_path / "header.csv"
    header_only.write_text("barcode,name,colour\n")
    assert "colour" in invsync.fails("import", str(header_only)).stderr


def test_import_of_an_empty_file_is_a_usage_error(invsync: Cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    result = invsync.fails("import", str(empty), code=2)
    assert "empty" in result.stderr
    assert "missing.csv" in invsync.fails("import", str(tmp_path / "missing.csv"), code=2).stderr


def _csv_rows(text: str) -> dict[str, dict[str, str]]:
    return {row["barcode"]: row for row in csv.DictReader(io.StringIO(text))}


def test_export_csv_and_json_to_stdout_and_to_a_file(invsync: Cli, tmp_path: Path) -> None:
    invsync.add("EXP-1", "Export Bulk, Quoted", "--qty", "9", "--notes", 'say "hi"')
    invsync.add("EXP-S", "Export Serial", "--serial", "--category", "Video")
    invsync.add("EXP-GONE", "Export Deleted")
    invsync.ok("item", "rm", "EXP-GONE")
    invsync.ok("checkout", "EXP-S", "--sheet", "JOB-EXP")
    total = len(invsync.json("item", "list")["items"])

    text = invsync.ok("export").stdout
    header = next(csv.reader(io.StringIO(text)))
    assert header[:7] == ["barcode", "name", "qty", "kind", "location", "category", "notes"]
    rows = _csv_rows(text)
    assert len(rows) == total and "EXP-GONE" not in rows
    assert rows["EXP-1"]["name"] == "Export Bulk, Quoted" and rows["EXP-1"]["qty"] == "9"
    assert rows["EXP-1"]["notes"] == 'say "hi"'
    assert (rows["EXP-S"]["kind"], rows["EXP-S"]["status"], rows["EXP-S"]["sheet"]) == (
        "serial",
        "out",
        "JOB-EXP",
    )

    items = {i["barcode"]: i for i in invsync.json("export", "--format", "json")["items"]}
    assert len(items) == total and "EXP-GONE" not in items
    assert items["EXP-1"] == invsync.item("EXP-1")

    csv_file = tmp_path / "out.csv"
    done = invsync.ok("export", "-o", str(csv_file))
    assert done.stdout == f"Exported {total} items to {csv_file}\n"
    assert _csv_rows(csv_file.read_text()) == rows

    json_file = tmp_path / "out.json"
    summary = invsync.json("export", "--format", "json", "-o", str(json_file))
    assert summary == {"exported": total, "file": str(json_file), "format": "json"}
    assert {i["barcode"]: i for i in json.loads(json_file.read_text())["items"]} == items


CATALOG_FIELDS = ("barcode", "name", "kind", "stock", "status", "location", "category", "notes")


def _catalog(cli: Cli) -> list[tuple[Any, ...]]:
    items = cli.json("item", "list")["items"]
    return sorted(tuple(i[f] for f in CATALOG_FIELDS) for i in items)


def test_csv_export_imports_into_a_fresh_station_as_the_same_items(tmp_path: Path) -> None:
    with running_daemon(name="source") as source_daemon:
        source = Cli(source_daemon.socket_path)
        source.add("RT-SPK", "QSC K10.2 Speaker", "--qty", "8", "--location", "Aisle 3")
        source.ok("checkout", "RT-SPK", "--qty", "2")
        source.add("RT-SER", "Console", "--serial", "--category", "Audio")
        source.add("RT-TXT", 'Ünïcode, "quoted"', "--notes", "two\nlines, and a comma")
        source.add("RT-ZERO", "Empty Shelf")
        source.add("RT-GONE", "Deleted Before Export")
        source.ok("item", "rm", "RT-GONE")
        exported = tmp_path / "catalog.csv"
        source.ok("export", "-o", str(exported))
        expected = _catalog(source)
    assert len(expected) == 4

    with running_daemon(name="target") as target_daemon:
        target = Cli(target_daemon.socket_path)
        result = target.ok("import", str(exported))
        assert result.stdout.startswith("Imported 4 items; 0 already present; 0 rows with errors")
        assert _catalog(target) == expected


def test_an_oversold_item_exports_a_quantity_an_import_accepts() -> None:
    """Stock below zero comes only from checkouts merged across stations; the export row
    must still import (qty 0) and keep the real figure in its stock column."""
    entry = {
        "barcode": "OVR-1",
        "name": "Oversold cable",
        "kind": "bulk",
        "stock": -2,
        "location": "",
        "category": "",
        "notes": "",
        "id": "0190a0b0-0000-7000-8000-000000000001",
        "status": "in",
        "sheet": None,
    }
    row = export_row(entry)
    header = [*CSV_COLUMNS, "id", "stock", "status", "sheet"]
    good, problems = parse_rows(header, [(2, [str(value) for value in row])])
    assert problems == []
    assert (good[0][1].barcode, good[0][1].qty) == ("OVR-1", 0)
    assert row[CSV_COLUMNS.index("qty")] == 0 and row[-3] == -2


# ---------------------------------------------------------------------- control API


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def _raw_request(
    station: Daemon, method: str, path: str, body: bytes | None = None
) -> tuple[int, str, Any]:
    conn = _UnixHTTP(station.socket_path)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), json.loads(response.read())
    finally:
        conn.close()


def _inventory(station: Daemon) -> Any:
    return _raw_request(station, "GET", "/v1/items?deleted=1&limit=100000")[2]


Request = tuple[str, str, bytes | None]


@pytest.mark.parametrize(
    ("request_", "status", "code"),
    [
        (("POST", "/v1/items", b'{"barcode": "API-1", "name": '), 400, "bad_json"),
        (("POST", "/v1/items", b'[{"barcode": "API-2", "name": "Array"}]'), 400, "bad_json"),
        (("POST", "/v1/items", b'"API-3"'), 400, "bad_json"),
        (("POST", "/v1/items", b"\xff\xfe{}"), 400, "bad_json"),
        (("POST", "/v1/items", b'{"barcode": "API-4", "name": "N", "qty": "2x"}'), 400, "invalid"),
        (("POST", "/v1/import", b'{"header": ["barcode", "name"], "rows": 5}'), 400, "invalid"),
        (("GET", "/v1/no-such-route", None), 404, None),
        (("POST", "/v2/items", b'{"barcode": "API-5", "name": "Wrong Version"}'), 404, None),
        (("DELETE", "/v1/status", None), 405, None),
    ],
    ids=[
        "truncated-json",
        "json-array",
        "json-string",
        "not-utf8",
        "qty-not-a-number",
        "import-rows-not-a-list",
        "unknown-route",
        "unknown-api-version",
        "wrong-method",
    ],
)
def test_control_api_answers_bad_requests_with_json_errors_and_changes_nothing(
    station: Daemon, request_: Request, status: int, code: str | None
) -> None:
    before = _inventory(station)
    got_status, content_type, data = _raw_request(station, *request_)
    assert got_status == status
    assert content_type.startswith("application/json")
    assert set(data) == {"error"}
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    if code is not None:
        assert data["error"]["code"] == code
    assert _inventory(station) == before

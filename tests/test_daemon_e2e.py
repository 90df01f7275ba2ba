"""The station daemon as an operator meets it: real ``invsyncd`` processes, real ``invsync``.

Every test starts ``invsyncd`` as a subprocess on a fresh data directory (sockets in a
short directory under /tmp) and drives it with the installed ``invsync`` executable or
with :class:`cli.client.ControlClient`, the client the CLI itself uses. What is checked is
what a person at a station would see: exit codes, messages, stock, history, files and
their modes, and the datagrams systemd would receive.

The first ``kill -9`` test picks its moments at random; its assertion messages carry the
seed, and ``INVSYNC_TEST_SEED=<seed>`` replays a run.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from cli.client import ApiFailure, ControlClient, DaemonUnreachable, item_route
from tests.daemon_harness import INVSYNC, INVSYNCD, Daemon, short_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: How long a client keeps retrying one scan while the daemon restarts (bounds the test).
RETRY_SECONDS = 20.0
#: SIGKILLs at random moments while scanners are busy (one more follows, when idle).
KILLS_WHILE_SCANNING = 3
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
#: invsyncd's exit status for bad settings (sysexits EX_CONFIG): the systemd unit's
#: RestartPreventExitStatus relies on it. Other refusals exit 1.
EXIT_CONFIG = 78
#: Variables that would make a daemon or CLI started here look somewhere else or log
#: differently (JOURNAL_STREAM switches to journal priorities).
_FOREIGN_ENV = (
    "JOURNAL_STREAM",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("INVSYNC_") and key not in _FOREIGN_ENV
    }
    env.update(extra)
    return env


@pytest.fixture
def base() -> Iterator[Path]:
    """A short, empty directory under /tmp (socket paths must stay under 108 bytes)."""
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Station(Daemon):
    """A test daemon that inherits neither systemd's nor an operator's settings."""

    @property
    def env(self) -> dict[str, str]:
        return clean_env(INVSYNC_SOCKET=str(self.socket_path))


@pytest.fixture
def station(base: Path) -> Iterator[Daemon]:
    """A daemon on ``base/data`` with its socket at ``base/ctl.sock``, not started yet."""
    daemon = Station(base / "data", base / "ctl.sock", name="dock-1")
    yield daemon
    try:
        daemon.stop(timeout=10)
    except Exception:
        daemon.kill()


def ok_json(daemon: Daemon, *args: str) -> Any:
    """Run ``invsync --json ARGS`` against ``daemon``; it must succeed."""
    result = daemon.cli("--json", *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return json.loads(result.stdout)


def add_item(daemon: Daemon, barcode: str, qty: int, *extra: str) -> None:
    result = daemon.cli(
        "item", "add", barcode, "--name", f"Item {barcode}", "--qty", str(qty), *extra
    )
    assert result.returncode == 0, result.stderr


def stock_of(daemon: Daemon, barcode: str) -> int:
    (found,) = ok_json(daemon, "item", "show", barcode)["items"]
    stock = found["stock"]
    assert isinstance(stock, int)
    return stock


def checkout_ids(daemon: Daemon, barcode: str) -> list[str]:
    movements = ok_json(daemon, "history", barcode)["movements"]
    return [m["id"] for m in movements if m["op"] == "checkout"]


def run_invsyncd(*args: str, peer_flags: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an ``invsyncd`` that is expected to refuse to start, and wait for it.

    ``peer_flags`` keeps it off mDNS and port 7420, so a refusal is never caused by
    another station on the test machine.
    """
    isolation = ["--no-mdns", "--listen", "127.0.0.1:0"] if peer_flags else []
    return subprocess.run(
        [INVSYNCD, *isolation, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        check=False,
    )


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.01)


# ---------------------------------------------------------------------- lifecycle


def test_sigterm_stops_cleanly_and_a_restart_keeps_stock_and_history(station: Daemon) -> None:
    station.start()
    add_item(station, "SPK001", 8, "--location", "Aisle 3")
    add_item(station, "MIX001", 0, "--serial")
    assert station.cli("checkout", "SPK001", "--qty", "3", "--sheet", "Gala").returncode == 0
    assert station.cli("return", "SPK001").returncode == 0
    assert station.cli("checkout", "MIX001", "--sheet", "Gala").returncode == 0
    station_id = ok_json(station, "status")["station"]["id"]
    items = ok_json(station, "item", "list")["items"]
    history = {code: ok_json(station, "history", code) for code in ("SPK001", "MIX001")}
    assert {i["barcode"]: (i["stock"], i["status"], i["sheet"]) for i in items} == {
        "SPK001": (6, "in", None),
        "MIX001": (0, "out", "Gala"),
    }
    assert [m["op"] for m in history["SPK001"]["movements"]] == ["add", "checkout", "return"]

    assert station.stop() == 0
    log = station.log().splitlines()
    ready = f"INFO invsyncd: station {station_id} (dock-1) ready: 0 items, control socket "
    assert [line for line in log if line.startswith(ready)] != [], log
    assert any(line.startswith("INFO invsyncd: stopping") for line in log), log
    assert not [line for line in log if line.startswith("DEBUG")], "INFO is the default level"
    assert not station.socket_path.exists(), "a clean stop leaves no stale socket"
    down = station.cli("status")
    assert down.returncode == 3
    assert "Start the daemon with 'invsyncd'" in down.stderr

    station.start()
    assert ok_json(station, "status")["station"]["id"] == station_id
    assert ok_json(station, "item", "list")["items"] == items
    for code in ("SPK001", "MIX001"):
        assert ok_json(station, "history", code) == history[code]


def test_piped_checkout_scan_of_500_barcodes(station: Daemon, base: Path) -> None:
    station.start()
    codes = [f"CASE-{n}" for n in range(5)]
    catalog = base / "catalog.csv"
    catalog.write_text("barcode,name,qty\n" + "".join(f"{c},Case {c},200\n" for c in codes))
    assert station.cli("import", str(catalog)).returncode == 0
    lines = [codes[n % 5] for n in range(500)]
    lines.insert(0, "NOPE-1")
    lines.insert(120, "NOPE-2")
    lines.append("NOPE-3")
    lines[10:10] = ["", "   "]  # a scanner's stray Enter is not a scan

    result = station.cli("scan", "--mode", "checkout", stdin="\n".join(lines) + "\n")

    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "503 scans: 500 ok, 3 not found, 0 failed"
    out = result.stdout.splitlines()
    assert len(out) == 503
    assert out.count("NOPE-2: not found") == 1
    assert out[-2:] == ["Checked out 1 × Case CASE-4 (CASE-4): 100 left", "NOPE-3: not found"]
    stock = {i["barcode"]: i["stock"] for i in ok_json(station, "item", "list")["items"]}
    assert stock == dict.fromkeys(codes, 100)
    assert len(checkout_ids(station, "CASE-0")) == 100


# ---------------------------------------------------------------------- kill -9


@dataclass
class Scanner:
    """A scanning client: checkouts with a fresh op id each, retried as the scan loop does."""

    socket_path: Path
    barcode: str
    stop: threading.Event
    acked: list[str] = field(default_factory=list)
    #: Scans whose first attempt hit a dead daemon and were sent again.
    retried: int = 0
    error: BaseException | None = None

    def run(self) -> None:
        client = ControlClient(self.socket_path, timeout=10.0)
        try:
            while not self.stop.is_set():
                op_id = str(uuid.uuid4())
                self._checkout(client, op_id)
                self.acked.append(op_id)
        except BaseException as exc:
            self.error = exc
        finally:
            client.close()

    def _checkout(self, client: ControlClient, op_id: str) -> None:
        body = {"qty": 1, "op_id": op_id, "operator": "kill-test"}
        deadline = time.monotonic() + RETRY_SECONDS
        failed = False
        while True:
            try:
                client.request("POST", item_route(self.barcode, "checkout"), body)
                return
            except DaemonUnreachable:
                if time.monotonic() > deadline:
                    raise
                if not failed:
                    self.retried += 1
                    failed = True
                client.close()
                time.sleep(0.05)


def test_kill_9_while_scanning_loses_no_ack_and_counts_none_twice(station: Daemon) -> None:
    seed = int(os.environ.get("INVSYNC_TEST_SEED") or time.time_ns() % 2**32)
    rng = random.Random(seed)
    initial = 100_000
    station.start()
    add_item(station, "KILL-1", initial)

    stop = threading.Event()
    scanners = [Scanner(station.socket_path, "KILL-1", stop) for _ in range(3)]
    threads = [threading.Thread(target=s.run, name=f"scanner {i}") for i, s in enumerate(scanners)]
    for thread in threads:
        thread.start()

    def acked() -> int:
        return sum(len(s.acked) for s in scanners)

    def wait_for_scans(more_than: int) -> None:
        wait_until(lambda: acked() > more_than, 20, f"scans after a restart (seed {seed})")

    try:
        for _ in range(KILLS_WHILE_SCANNING):
            # The restarted daemon must have served scans before the next kill.
            wait_for_scans(acked())
            time.sleep(rng.uniform(0.0, 0.3))
            station.kill()
            station.start()
        wait_for_scans(acked() + 10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(RETRY_SECONDS + 15)
    assert not any(thread.is_alive() for thread in threads), f"seed {seed}: a scanner hangs"
    for scanner in scanners:
        assert scanner.error is None, f"seed {seed}: {scanner.error!r}"
    assert sum(s.retried for s in scanners) >= KILLS_WHILE_SCANNING, "kills hit the scanners"

    # Everything acknowledged must be on disk, not only in the killed process's memory.
    station.kill()
    station.start()
    acked_ids = [op for s in scanners for op in s.acked]
    history_ids = checkout_ids(station, "KILL-1")
    twice = [op for op, n in Counter(history_ids).items() if n > 1]
    assert twice == [], f"seed {seed}: {len(twice)} checkouts counted twice, e.g. {twice[:3]}"
    lost = set(acked_ids) - set(history_ids)
    unasked = set(history_ids) - set(acked_ids)
    assert not lost and not unasked, (
        f"seed {seed}: of {len(acked_ids)} acknowledged checkouts {len(lost)} are missing "
        f"(e.g. {sorted(lost)[:3]}); {len(unasked)} others appeared (e.g. {sorted(unasked)[:3]})"
    )
    left = initial - len(acked_ids)
    assert stock_of(station, "KILL-1") == left, f"seed {seed}"

    # A scan whose answer was lost is sent again with its op id, here after a restart
    # (so only the store on disk knows it): it is answered, and nothing is counted again.
    client = ControlClient(station.socket_path, timeout=10.0)
    try:
        for op_id in acked_ids[:: max(len(acked_ids) // 20, 1)]:
            body = {"qty": 1, "op_id": op_id, "operator": "kill-test"}
            answer = client.request("POST", item_route("KILL-1", "checkout"), body)
            assert answer["item"]["stock"] == left
    finally:
        client.close()
    assert len(checkout_ids(station, "KILL-1")) == len(acked_ids)


def test_scan_loop_retries_through_a_kill_9_without_double_counting(station: Daemon) -> None:
    initial, total = 1000, 150
    station.start()
    add_item(station, "SCAN-1", initial)
    stderr_path = station.data_dir.parent / "scan.err"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [INVSYNC, "--socket", str(station.socket_path), "--json", "scan", "--mode", "checkout"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=station.env,
        )
    assert proc.stdin is not None
    assert proc.stdout is not None
    results: queue.Queue[str] = queue.Queue()

    def feed(stdin: IO[str]) -> None:
        for _ in range(total):
            stdin.write("SCAN-1\n")
            stdin.flush()
            time.sleep(0.01)
        stdin.close()

    def read(stdout: IO[str]) -> None:
        for line in stdout:
            results.put(line)

    feeder = threading.Thread(target=feed, args=(proc.stdin,), name="feeder")
    reader = threading.Thread(target=read, args=(proc.stdout,), name="reader")
    feeder.start()
    reader.start()
    try:
        wait_until(lambda: results.qsize() >= 30, 20, "the first scans")
        station.kill()
        station.start()
        feeder.join(30)
        code = proc.wait(RETRY_SECONDS + 30)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    lines = [json.loads(results.get_nowait()) for _ in range(results.qsize())]
    assert code == 0, stderr_path.read_text()
    assert lines[-1] == {"summary": {"scans": total, "ok": total, "not_found": 0, "failed": 0}}
    reported_ok = sum(1 for line in lines[:-1] if line.get("ok") is True)
    assert reported_ok == total
    assert "retrying" in stderr_path.read_text(), "the operator was told about the restart"
    assert stock_of(station, "SCAN-1") == initial - reported_ok
    assert len(checkout_ids(station, "SCAN-1")) == reported_ok


# ---------------------------------------------------------------------- systemd notify


class NotifyListener:
    """A datagram socket standing in for systemd's ``NOTIFY_SOCKET``.

    Datagrams are read in the background as they come: the kernel queues only a few
    (``net.unix.max_dgram_qlen``), and the daemon drops what does not fit.
    """

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.received: queue.Queue[tuple[float, dict[str, str]]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify reader", daemon=True)
        self._thread.start()

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.received.put((time.monotonic(), fields))

    def next_with(self, key: str) -> tuple[float, dict[str, str]]:
        """The next datagram that carries ``key`` and when it came (others are skipped)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                at, fields = self.received.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"systemd got no {key}= within 10 s") from None
            if key in fields:
                return at, fields

    def until(self, deadline: float) -> list[dict[str, str]]:
        """Every datagram that arrives before ``deadline`` (monotonic)."""
        messages = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                at, fields = self.received.get(timeout=left)
            except queue.Empty:
                break
            if at <= deadline:
                messages.append(fields)
        return messages


def test_one_barcode_added_by_many_clients_at_once_makes_one_item(station: Daemon) -> None:
    """Eight scanners adding the same new barcode at the same moment: one item, the rest
    are told it exists (the check and the commit are one step for the API)."""
    station.start()
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def add() -> None:
        client = ControlClient(station.socket_path, timeout=30)
        try:
            barrier.wait(10)
            client.request("POST", "items", {"barcode": "RACE-1", "name": "Racing item"})
            outcomes.append("created")
        except ApiFailure as exc:
            outcomes.append(exc.code)
        finally:
            client.close()

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["created"] + ["exists"] * 7
    assert len(ok_json(station, "item", "show", "RACE-1")["items"]) == 1


def test_a_retried_count_reports_the_change_it_recorded(station: Daemon) -> None:
    """A scanner that lost the answer to a count retries it with the same op id: nothing
    is counted twice, and the answer says what the count changed the first time."""
    station.start()
    add_item(station, "CNT-1", 8)
    client = ControlClient(station.socket_path, timeout=30)
    try:
        body = {"counted": 5, "op_id": str(uuid.uuid4())}
        first = client.request("POST", item_route("CNT-1", "count"), body)
        again = client.request("POST", item_route("CNT-1", "count"), body)
    finally:
        client.close()
    assert first["change"] == again["change"] == -3
    assert again["item"]["stock"] == 5
    # Without an op id (a script): each count is its own, and says what it changed.
    client = ControlClient(station.socket_path, timeout=30)
    try:
        plain = client.request("POST", item_route("CNT-1", "count"), {"counted": 7})
    finally:
        client.close()
    assert (plain["change"], plain["item"]["stock"]) == (2, 7)
    counts = [m for m in ok_json(station, "history", "CNT-1")["movements"] if m["op"] == "count"]
    assert [m["qty"] for m in counts] == [-3, 2]


def test_sd_notify_ready_watchdog_and_stopping(station: Daemon, base: Path) -> None:
    path = base / "notify"
    with NotifyListener(str(path)) as systemd:
        env = {**station.env, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        env.pop("WATCHDOG_PID", None)
        station.start(env=env)
        ready_at, ready = systemd.next_with("READY")
        assert ready["READY"] == "1"
        assert ready["STATUS"] == "ready: 0 items"
        pings = [m for m in systemd.until(ready_at + 0.5) if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 2, "WATCHDOG=1 every half of WATCHDOG_USEC"
        assert station.stop() == 0
        _, stopping = systemd.next_with("STOPPING")
        assert stopping["STOPPING"] == "1"


def test_sd_notify_on_an_abstract_socket(station: Daemon) -> None:
    name = f"invsync-test-{uuid.uuid4().hex}"
    with NotifyListener(b"\0" + name.encode()) as systemd:
        # The watchdog belongs to another process (WATCHDOG_PID): this one must not ping.
        env = {**station.env, "NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "200000"}
        env["WATCHDOG_PID"] = "1"
        station.start(env=env)
        ready_at, ready = systemd.next_with("READY")
        assert ready["READY"] == "1"
        assert not [m for m in systemd.until(ready_at + 0.3) if "WATCHDOG" in m]
        assert station.stop() == 0
        assert systemd.next_with("STOPPING")[1]["STOPPING"] == "1"


# ---------------------------------------------------------------------- refusing to start


def test_second_daemon_on_the_same_data_dir_refuses(station: Daemon, base: Path) -> None:
    station.start()
    assert station.proc is not None
    second = run_invsyncd("--data-dir", str(station.data_dir), "--socket", str(base / "b.sock"))
    assert second.returncode == 1
    assert "already using" in second.stderr
    assert str(station.data_dir) in second.stderr
    assert f"pid {station.proc.pid}" in second.stderr
    assert not (base / "b.sock").exists()
    assert station.cli("status").returncode == 0, "the first daemon still serves"


def test_data_dir_readable_by_others_is_refused(base: Path) -> None:
    data = base / "data"
    data.mkdir()
    data.chmod(0o755)
    result = run_invsyncd("--data-dir", str(data), "--socket", str(base / "ctl.sock"))
    assert result.returncode == 78  # EX_CONFIG: systemd does not retry
    assert f"chmod 700 {data}" in result.stderr
    assert not (data / "station.key").exists()


def test_socket_in_an_unusable_directory_is_refused(base: Path) -> None:
    # The parent is a regular file, so even root cannot create the socket there.
    (base / "plain-file").write_text("not a directory\n")
    sock = base / "plain-file" / "ctl.sock"
    result = run_invsyncd("--data-dir", str(base / "data"), "--socket", str(sock))
    assert result.returncode == 1
    assert f"cannot serve the control socket {sock}" in result.stderr
    assert "Traceback" not in result.stderr


def test_socket_path_too_long_is_refused(base: Path) -> None:
    sock = "/tmp/" + "s" * 110
    result = run_invsyncd("--data-dir", str(base / "data"), "--socket", sock)
    assert result.returncode == EXIT_CONFIG
    assert "setting socket" in result.stderr
    assert "107 bytes" in result.stderr
    assert not (base / "data").exists(), "nothing is created before the settings are valid"


def test_bad_value_in_the_config_file_is_refused(base: Path) -> None:
    config = base / "invsync.toml"
    config.write_text('data_dir = "/nonexistent"\nlisten = "nowhere"\n')
    # No --listen flag here: it would override the file.
    result = run_invsyncd("--config", str(config), peer_flags=False)
    assert result.returncode == EXIT_CONFIG
    assert "setting listen = 'nowhere'" in result.stderr
    assert "HOST:PORT" in result.stderr


# ---------------------------------------------------------------------- logs


@pytest.mark.parametrize("level", ["WARNING", "DEBUG"])
def test_log_level_decides_what_reaches_stderr(station: Daemon, level: str) -> None:
    out_path = station.data_dir.parent / "out.log"
    err_path = station.data_dir.parent / "err.log"
    args = [INVSYNCD, "--data-dir", str(station.data_dir), "--socket", str(station.socket_path)]
    args += ["--no-mdns", "--listen", "127.0.0.1:0", "--name", "dock-1"]
    args += ["--log-level", level.lower()]
    with out_path.open("w") as out, err_path.open("w") as err:
        station.proc = subprocess.Popen(args, stdout=out, stderr=err, env=station.env)
    station.wait_ready(20)
    assert station.cli("status").returncode == 0
    assert station.stop() == 0

    assert out_path.read_text() == "", "stdout stays clean"
    lines = err_path.read_text().splitlines()
    ready = [
        line for line in lines if re.match(r"INFO invsyncd: station \S+ \(dock-1\) ready", line)
    ]
    levels = {line.split(" ", 1)[0] for line in lines if LOG_LINE.match(line)}
    if level == "WARNING":
        assert ready == []
        assert levels <= {"WARNING", "ERROR", "CRITICAL"}
    else:
        assert len(ready) == 1
        assert f"control socket {station.socket_path}" in ready[0]
        assert "DEBUG" in levels


# ---------------------------------------------------------------------- zero config


def test_zero_config_creates_the_station_and_serves(base: Path) -> None:
    data = base / "state" / "invsync"
    sock = base / "ctl.sock"
    cwd = base / "empty"
    cwd.mkdir()
    # Tests never send to the host's real network: peer listening and mDNS are pinned to
    # loopback. Everything else is the zero-config default.
    env = clean_env(
        INVSYNC_DATA_DIR=str(data),
        INVSYNC_SOCKET=str(sock),
        INVSYNC_LISTEN="127.0.0.1:0",
        INVSYNC_MDNS_INTERFACES="127.0.0.1",
    )
    daemon = Daemon(data, sock)
    daemon.log_path = base / "daemon.log"
    with daemon.log_path.open("w") as log:
        daemon.proc = subprocess.Popen(
            [INVSYNCD], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        daemon.wait_ready(20)

        def mode(path: Path) -> int:
            return stat.S_IMODE(path.stat().st_mode)

        assert mode(data) == 0o700
        assert mode(data / "inventory.db") == 0o600
        assert mode(data / "station.key") == 0o600
        assert mode(sock) == 0o660
        assert list(cwd.iterdir()) == [], "nothing is written to the working directory"

        def cli(*args: str) -> Any:
            result = subprocess.run(
                [INVSYNC, "--json", *args],
                capture_output=True,
                text=True,
                timeout=30,
                env=env,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        status = cli("status")
        station_id = status["station"]["id"]
        assert re.fullmatch(r"[A-Z2-7]{16}", station_id)
        assert status["station"]["name"] == socket.gethostname()
        assert status["data_dir"] == str(data)
        assert status["items"] == 0
        (member,) = cli("fleet", "members")["members"]
        assert (member["station_id"], member["name"]) == (station_id, socket.gethostname())
        assert member["this_station"] is True and member["revoked"] is False
        # The first station founds a fleet: it holds the CA and its own certificate.
        fleet = cli("fleet", "id")
        assert fleet["holds_ca"] is True
        for key in ("station.key", "fleet-ca.key"):
            assert (data / key).stat().st_mode & 0o777 == 0o600, key
    finally:
        code = daemon.stop(timeout=10)
    assert code == 0, daemon.log()


def test_peer_port_already_taken_is_a_clear_error(base: Path) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = run_invsyncd(
            "--data-dir",
            str(base / "data"),
            "--socket",
            str(base / "ctl.sock"),
            "--listen",
            f"127.0.0.1:{port}",
        )
    finally:
        holder.close()
    assert result.returncode == 78
    assert f"setting listen = 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr

"""
The daemon as operators run it: `twistd -n pushie` and `twistd -ny pushie.tac`
as real processes, SIGTERM, several endpoints, and the built wheel installed in
a scratch virtualenv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.web.client import Agent, HTTPConnectionPool

from tests.helpers import connect_ws, wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LISTENING = re.compile(rb"Pushie listening on (\S+) \(([^)]*)\)")


class Twistd(ProcessProtocol):
    """A twistd child process whose log we read."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()
        self.addresses: dict[str, str] = {}

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for endpoint, address in LISTENING.findall(self.output):
            self.addresses[endpoint.decode()] = address.decode()

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        # twistd ends a SIGTERM'd run by re-raising the signal, so a clean
        # stop shows as "terminated by SIGTERM"; report that as 0.
        value = reason.value
        if value.exitCode is None and value.signal == signal.SIGTERM:
            self.ended.callback(0)
        else:
            self.ended.callback(value.exitCode if value.exitCode is not None else -value.signal)

    def port_of(self, endpoint: str) -> int:
        return int(self.addresses[endpoint].rsplit(":", 1)[1])


def spawn(
    args: list[str], env_extra: dict[str, str] | None = None, cwd: Path = ROOT, executable: str | None = None
) -> Twistd:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHIE_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(env_extra or {})
    proto = Twistd()
    program = executable or str(BIN / "twistd")
    reactor.spawnProcess(proto, program, [program, *args], env=env, path=str(cwd))
    return proto


async def stop(proc: Twistd) -> int:
    if not proc.ended.called:
        proc.transport.signalProcess("TERM")
    return await proc.ended


@pytest_twisted.ensureDeferred
async def test_twistd_plugin_serves_tcp_and_unix_and_drains_on_sigterm(tmp_path):
    sock = tmp_path / "p.sock"
    tcp = "tcp:0:interface=127.0.0.1"
    proc = spawn(["-n", "--pidfile=", "pushie", "--listen", tcp, "--listen", f"unix:{sock}"])
    try:
        await wait_for(lambda: len(proc.addresses) == 2 or proc.ended.called, timeout=20)
        assert len(proc.addresses) == 2, proc.output.decode()
        port = proc.port_of(tcp)
        log = proc.output.decode()
        assert "engine memory" in log and "Publishing is OPEN" in log

        client = await connect_ws(port, "/websocket?channel=bunno")
        assert (await client.next_of("welcome"))["client"]
        await client.next_of("subscribed")

        # Publish through the Unix socket; receive over TCP.
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(str(sock)), pool=pool)
        response = await treq.client.HTTPClient(agent).post(
            "http://localhost/publish",
            data=b'{"Channel": "bunno", "Data": {"message": {"text":"oh hai", "username": "jufisch"}}}',
            headers={"Content-Type": "application/json"},
        )
        assert response.code == 200
        assert json.loads(await response.content())["offset"] == 1
        message = await client.next_of("message")
        assert message["data"] == {"message": {"text": "oh hai", "username": "jufisch"}}

        # SIGTERM: the client hears 1001, the process exits cleanly.
        proc.transport.signalProcess("TERM")
        code, _ = await client.closed
        assert code == 1001
        assert await proc.ended == 0
        assert "Traceback" not in proc.output.decode()
        assert not sock.exists()
    finally:
        await stop(proc)


class _UnixEndpoints:
    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(reactor, self.path)


@pytest_twisted.ensureDeferred
async def test_tac_file_reads_the_environment(tmp_path):
    proc = spawn(
        ["-ny", str(ROOT / "pushie.tac"), "--pidfile="],
        {"PUSHIE_LISTEN": "tcp:0:interface=127.0.0.1", "PUSHIE_MAX_MESSAGE_SIZE": "100"},
    )
    try:
        await wait_for(lambda: proc.addresses or proc.ended.called, timeout=20)
        assert proc.addresses, proc.output.decode()
        port = next(iter(proc.addresses.values())).rsplit(":", 1)[1]
        pool = HTTPConnectionPool(reactor, persistent=False)
        url = f"http://127.0.0.1:{port}/publish"
        ok = await treq.post(url, json={"channel": "c", "data": 1}, pool=pool)
        assert ok.code == 200
        big = await treq.post(url, json={"channel": "c", "data": "x" * 100}, pool=pool)
        assert big.code == 413  # PUSHIE_MAX_MESSAGE_SIZE was read
        await big.content()
        await ok.content()
    finally:
        assert await stop(proc) == 0


@pytest_twisted.ensureDeferred
async def test_bad_setting_stops_startup_with_a_message():
    proc = spawn(["-n", "--pidfile=", "pushie", "--max-message-size", "lots"])
    code = await proc.ended
    assert code != 0
    assert b"bad value for 'max_message_size'" in proc.output, proc.output
    assert b"Traceback" not in proc.output


def test_wheel_installs_the_plugin_outside_the_checkout(tmp_path):
    """Build the wheel, install it in a scratch venv, find `pushie` in `twistd --help`."""
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "dropin.cache"),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    (wheel,) = wheels.glob("pushie-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/pushie_plugin.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert "pushie/static/index.html" in names and "pushie/py.typed" in names
    assert not any(n.startswith("tests/") for n in names)
    # pyproject's `packages` list is explicit: a new subpackage must be added there.
    shipped = {n for n in names if n.startswith("pushie/") and n.endswith(".py")}
    checkout = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pushie").rglob("*.py")}
    assert shipped == checkout, sorted(shipped ^ checkout)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # A real install, dependencies included (pip's cache makes it quick once
    # the test environment itself has been installed).
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, timeout=600)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("PUSHIE_")}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import pushie, pushie.tap, twisted.plugins.pushie_plugin as p; print(pushie.__file__); print(p.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=outside,
        env=env,
    ).stdout.split()
    assert all(w.startswith(str(venv)) for w in where), where
    twistd = [str(venv / "bin" / "python"), "-c", "from twisted.scripts.twistd import run; run()"]
    helped = subprocess.run([*twistd, "--help"], capture_output=True, text=True, cwd=outside, env=env, timeout=60)
    assert re.search(r"^\s+pushie\s+A real-time push server", helped.stdout, re.M), helped.stdout
    version = subprocess.run(
        [str(venv / "bin" / "pushie"), "--version"], capture_output=True, text=True, cwd=outside, env=env, timeout=60
    )
    assert version.stdout.strip().startswith("pushie ")


def _busy_port() -> tuple[socket.socket, int]:
    """A port that something else listens on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder, holder.getsockname()[1]


async def _assert_refuses_to_start(proc: Twistd, busy: int) -> None:
    await wait_for(lambda: proc.ended.called, timeout=20)
    code = await proc.ended
    output = proc.output.decode()
    assert code != 0, output
    assert output.count(f"Pushie could not listen on tcp:{busy}:interface=127.0.0.1:") == 1, output
    assert output.count("could not") == 1, output
    assert "Unhandled" not in output and "Traceback" not in output, output


@pytest_twisted.ensureDeferred
async def test_a_busy_port_stops_the_plugin_with_one_line_and_status_1():
    holder, busy = _busy_port()
    try:
        free = "tcp:0:interface=127.0.0.1"
        proc = spawn(["-n", "--pidfile=", "pushie", "--listen", free, "--listen", f"tcp:{busy}:interface=127.0.0.1"])
        try:
            await _assert_refuses_to_start(proc, busy)
        finally:
            await stop(proc)
    finally:
        holder.close()


@pytest_twisted.ensureDeferred
async def test_a_busy_port_stops_the_tac_with_one_line_and_status_1():
    holder, busy = _busy_port()
    try:
        proc = spawn(
            ["-ny", str(ROOT / "pushie.tac"), "--pidfile="],
            {"PUSHIE_LISTEN": f"tcp:0:interface=127.0.0.1 tcp:{busy}:interface=127.0.0.1"},
        )
        try:
            await _assert_refuses_to_start(proc, busy)
        finally:
            await stop(proc)
    finally:
        holder.close()


@pytest_twisted.ensureDeferred
async def test_the_listen_backlog_is_511_unless_the_endpoint_gives_one(tmp_path):
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to read the kernel's backlog")
    tcp, explicit = "tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=64"
    proc = spawn(["-n", "--pidfile=", "pushie", "--listen", tcp, "--listen", explicit])
    try:
        await wait_for(lambda: len(proc.addresses) == 2 or proc.ended.called, timeout=20)
        assert len(proc.addresses) == 2, proc.output.decode()
        # The kernel's word for it: `ss` shows a listening socket's backlog.
        backlogs = _listen_backlogs()
        assert backlogs[proc.port_of(tcp)] == 511
        assert backlogs[proc.port_of(explicit)] == 64
    finally:
        await stop(proc)


def _listen_backlogs() -> dict[int, int]:
    """Listening TCP ports and their backlogs (`ss -ltn`: Send-Q is the backlog of a listening socket)."""
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    backlogs = {}
    for line in out.splitlines():
        fields = line.split()
        backlogs[int(fields[3].rsplit(":", 1)[1])] = int(fields[2])
    return backlogs


@pytest_twisted.ensureDeferred
async def test_the_daemon_tunes_the_garbage_collector_unless_told_not_to():
    tuned = spawn(["-n", "--pidfile=", "pushie", "--listen", "tcp:0:interface=127.0.0.1", "--gc-threshold", "30000"])
    untouched = spawn(
        ["-n", "--pidfile=", "pushie", "--listen", "tcp:0:interface=127.0.0.1"], {"PUSHIE_GC_THRESHOLD": "0"}
    )
    try:
        await wait_for(lambda: all(p.addresses or p.ended.called for p in (tuned, untouched)), timeout=20)
        assert tuned.addresses and untouched.addresses, (tuned.output + untouched.output).decode()
        found = re.search(
            rb"Garbage collector: (\d+) startup objects frozen, young generation every (\d+)", tuned.output
        )
        assert found is not None, tuned.output.decode()
        assert int(found.group(1)) > 1000 and int(found.group(2)) == 30000
        assert b"Garbage collector" not in untouched.output
    finally:
        await stop(tuned)
        await stop(untouched)


def test_tune_gc_freezes_the_heap_and_sets_the_young_threshold():
    import gc

    from pushie.tap import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc(12345)
        assert gc.get_threshold() == (12345, before[1], before[2])
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

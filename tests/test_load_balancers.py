"""
The README's load balancer configurations, run for real (issue 14): the
C{nginx} and C{haproxy} blocks of "Running a cluster" are read from README.md,
given free ports instead of 443 and the example addresses (and no TLS), and
put in front of two in-process daemons on one Redis.  Through each: WebSocket
subscribers on both daemons get a message published through the balancer, an
SSE stream gets it too (nothing buffers it).  Through HAProxy with
C{send-proxy-v2} to C{haproxy:} endpoints: the health checks pass (they carry
the PROXY header) and the daemons count and limit the clients' own addresses
(clients connect from 127.0.0.2 and 127.0.0.3; HAProxy from 127.0.0.1).

Needs the C{haproxy} and C{nginx} binaries (Debian: haproxy, nginx-light);
without them the tests skip, or fail when C{PUSHIE_REQUIRE_HAPROXY=1} /
C{PUSHIE_REQUIRE_NGINX=1} (as in CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory

from tests.helpers import (
    WSClient,
    WSClientProtocol,
    _RawClient,
    assert_reactor_clean,
    parse_http_answers,
    start_daemon,
    wait_for,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def require_binary(name: str, flag: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        reason = f"{name} is not installed (Debian: apt-get install {'nginx-light' if name == 'nginx' else name})"
        if os.environ.get(flag) == "1":
            pytest.fail(f"{reason} and {flag}=1 is set")
        pytest.skip(reason)
    return path


def readme_block(language: str) -> str:
    """The README's ```<language> block in "Running a cluster"."""
    text = README.read_text()
    section = text[text.index("## Running a cluster") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"expected one {language} block in README's Running a cluster"
    return blocks[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Balancer:
    """A load balancer process started by a test; stopped (SIGTERM, then SIGKILL) by L{stop}."""

    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.port = port
        self.log_path = log
        self.log = open(log, "wb")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    async def ready(self) -> None:
        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.process.args[0]} exited: {self.log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        await wait_for(listening, timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


async def connect_ws_from(port: int, path: str, source: str) -> WSClient:
    """
    An Autobahn client connecting from the local address C{source} (any
    127.x.y.z on Linux), subscribed (its welcome and subscribed frames read).
    """
    client = WSClient()
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}")
    factory.protocol = WSClientProtocol
    factory.client = client
    factory.setProtocolOptions(failByDrop=False, closeHandshakeTimeout=2)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0)).connect(factory)
    await client.opened
    await client.next_of("welcome")
    await client.next_of("subscribed")
    return client


async def publish(port: int, channel: str, data: object, source: str = "127.0.0.1") -> int:
    """POST /publish from the local address C{source}; the answer's status."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    client = await endpoint.connect(Factory.forProtocol(_RawClient))
    body = json.dumps({"channel": channel, "data": data}).encode()
    client.transport.write(
        b"POST /publish HTTP/1.1\r\nHost: push.example.com\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    await wait_for(lambda: client.lost.called or any(a.complete for a in parse_http_answers(client.received)))
    answers = parse_http_answers(client.received)
    if not client.lost.called:
        client.transport.abortConnection()
        await client.lost
    assert answers, client.received[:300]
    return answers[0].status


async def check_sse(port: int, channel: str, source: str = "127.0.0.1") -> None:
    """An SSE stream through the balancer gets a message published through it while the stream stays open."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    stream = await endpoint.connect(Factory.forProtocol(_RawClient))
    stream.transport.write(f"GET /events?channel={channel} HTTP/1.1\r\nHost: push.example.com\r\n\r\n".encode())
    try:
        await wait_for(lambda: b"event: subscribed" in stream.received or stream.lost.called)
    except AssertionError:
        raise AssertionError(f"no subscribed event; received {stream.received[:500]!r}") from None
    assert b"200 OK" in stream.received.split(b"\r\n", 1)[0], stream.received[:200]
    assert await publish(port, channel, {"sse": "through"}, source) == 200
    await wait_for(lambda: b'"sse":"through"' in stream.received.replace(b" ", b"") or stream.lost.called)
    assert not stream.lost.called
    stream.transport.abortConnection()
    await stream.lost


async def close_clients(clients: list[WSClient]) -> None:
    for client in clients:
        client.close()
    for client in clients:
        await client.closed


@pytest_twisted.ensureDeferred
async def test_haproxy_with_proxy_protocol(redis_server, tmp_path):
    haproxy = require_binary("haproxy", "PUSHIE_REQUIRE_HAPROXY")
    redis_server.cli("FLUSHALL")
    daemons = [
        await start_daemon(
            engine=redis_server.url, listen=["haproxy:tcp:0:interface=127.0.0.1"], max_connections_per_ip=1
        )
        for _ in range(2)
    ]
    port = free_port()
    config = readme_block("haproxy")
    server_lines = re.findall(r"^\s*server p\d \S+ (.*)$", config, re.M)
    assert server_lines and all("send-proxy" in options for options in server_lines)
    options = server_lines[0].replace("inter 2s", "inter 100")  # quicker checks for the test
    config = re.sub(r"^\s*server p\d .*\n", "", config, flags=re.M)
    config = re.sub(r"bind :443 ssl crt \S+", f"bind 127.0.0.1:{port}", config)
    assert f"bind 127.0.0.1:{port}" in config
    config += "".join(f"    server p{i} 127.0.0.1:{d.port} {options}\n" for i, d in enumerate(daemons))
    stats = tmp_path / "admin.sock"
    (tmp_path / "haproxy.cfg").write_text(f"global\n    stats socket {stats} level admin\n" + config)
    balancer = Balancer([haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")], port, tmp_path / "haproxy.log")
    clients: list[WSClient] = []
    try:
        await balancer.ready()

        def checks() -> dict[str, tuple[str, str]]:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(stats))
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            lines = data.decode().splitlines()
            names = lines[0].lstrip("# ").split(",")
            rows = [dict(zip(names, line.split(","), strict=False)) for line in lines[1:] if line]
            servers = [r for r in rows if r["pxname"] == "pushie" and r["svname"] != "BACKEND"]
            # "* L7OK": the last check passed and the next one is running now.
            return {r["svname"]: (r["status"], r["check_status"].removeprefix("* ")) for r in servers}

        # The health checks (GET /healthz with a PROXY header) pass on both.
        last: dict[str, tuple[str, str]] = {}

        def healthy() -> bool:
            last.update(checks())
            return set(last.values()) == {("UP", "L7OK")} and len(last) == 2

        try:
            await wait_for(healthy, timeout=10)
        except AssertionError:
            raise AssertionError(f"HAProxy's checks: {last}; {balancer.log_path.read_text()[-2000:]}") from None

        # Clients from two addresses: the daemons see those, not HAProxy's.
        clients.append(await connect_ws_from(port, "/websocket?channel=room", "127.0.0.2"))
        clients.append(await connect_ws_from(port, "/websocket?channel=room", "127.0.0.3"))
        seen = sorted(a for d in daemons for a in d.hub.connections.values())
        assert seen == ["127.0.0.2", "127.0.0.3"]
        assert sorted(len(d.hub.connections) for d in daemons) == [1, 1]  # leastconn: one on each

        # max_connections_per_ip = 1 per daemon: more from 127.0.0.2 find
        # room on the other daemon once (leastconn rotates over equals), and
        # are refused by both after that.
        outcomes: list[str] = []
        while outcomes.count("open") < 1 and len(outcomes) < 6:
            try:
                clients.append(await connect_ws_from(port, "/websocket?channel=room", "127.0.0.2"))
                outcomes.append("open")
            except ConnectionError:
                outcomes.append("refused")
        with pytest.raises(ConnectionError):
            await connect_ws_from(port, "/websocket?channel=room", "127.0.0.2")
        assert outcomes.count("open") == 1, outcomes
        assert sorted(a for d in daemons for a in d.hub.connections.values()) == ["127.0.0.2", "127.0.0.2", "127.0.0.3"]
        assert sorted(len(d.hub.connections) for d in daemons) == [1, 2]
        await wait_for(lambda: all(d.service.site.limits.pending == 0 for d in daemons))

        # A message published through HAProxy reaches the subscribers of both daemons.
        assert await publish(port, "room", {"via": "haproxy"}, source="127.0.0.5") == 200
        for client in clients:
            message = await client.next_of("message")
            assert message["data"] == {"via": "haproxy"}
        # (HAProxy's health checks come from 127.0.0.1, and count: per address 1.)
        await check_sse(port, "sse-room", source="127.0.0.4")
        # No health check was refused meanwhile: both daemons are still UP.
        assert healthy(), last
        assert "is DOWN" not in balancer.log_path.read_text()
    finally:
        await close_clients(clients)
        balancer.stop()
        for daemon in daemons:
            await daemon.stop()
    await assert_reactor_clean()


@pytest_twisted.ensureDeferred
async def test_nginx(redis_server, tmp_path):
    nginx = require_binary("nginx", "PUSHIE_REQUIRE_NGINX")
    redis_server.cli("FLUSHALL")
    daemons = [await start_daemon(engine=redis_server.url) for _ in range(2)]
    port = free_port()
    snippet = readme_block("nginx")
    server_options = re.findall(r"^\s*server 10\.0\.0\.\d+:8080(.*);$", snippet, re.M)
    assert server_options
    snippet = re.sub(r"^\s*server 10\.0\.0\.\d+:8080.*\n", "", snippet, flags=re.M)
    snippet = snippet.replace(
        "    least_conn;\n",
        "    least_conn;\n" + "".join(f"    server 127.0.0.1:{d.port}{server_options[0]};\n" for d in daemons),
    )
    snippet = snippet.replace("listen 443 ssl;", f"listen 127.0.0.1:{port};")
    assert f"listen 127.0.0.1:{port};" in snippet and "127.0.0.1:" + str(daemons[1].port) in snippet
    temp = "".join(
        f"    {kind}_temp_path {tmp_path / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n"
        + "events { worker_connections 256; }\n"
        + f"http {{\n    access_log off;\n{temp}{snippet}}}\n"
    )
    command = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")]
    balancer = Balancer(command, port, tmp_path / "nginx.log")
    clients: list[WSClient] = []
    try:
        await balancer.ready()
        # WebSocket upgrades pass; least_conn puts one subscriber on each daemon.
        for _ in range(2):
            clients.append(await connect_ws_from(port, "/websocket?channel=room", "127.0.0.1"))
        assert sorted(len(d.hub.connections) for d in daemons) == [1, 1]
        assert await publish(port, "room", {"via": "nginx"}) == 200
        for client in clients:
            assert (await client.next_of("message"))["data"] == {"via": "nginx"}
        await check_sse(port, "sse-room")
    finally:
        await close_clients(clients)
        balancer.stop()
        for daemon in daemons:
            await daemon.stop()
    await assert_reactor_clean()

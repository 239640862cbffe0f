"""Running it in production: JSON logs, TLS, systemd socket activation, the settings reference."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from pushie.config import settings_reference
from tests.helpers import WSClient, WSClientProtocol, wait_for
from tests.redis_server import free_port
from tests.test_daemon import ROOT, spawn, stop

README = ROOT / "README.md"


def make_certificate(directory: Path) -> tuple[Path, Path, bytes]:
    """A self-signed certificate for 127.0.0.1, made here: (key file, cert file, cert PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = directory / "key.pem", directory / "cert.pem"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file.write_bytes(pem)
    return key_file, cert_file, pem


@pytest_twisted.ensureDeferred
async def test_tls_endpoint_serves_https_and_wss(make_daemon, tmp_path):
    key_file, cert_file, pem = make_certificate(tmp_path)
    daemon = await make_daemon(listen=[f"ssl:0:interface=127.0.0.1:privateKey={key_file}:certKey={cert_file}"])
    trust = ssl.Certificate.loadPEM(pem)
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust), pool=pool)
    url = f"https://127.0.0.1:{daemon.port}"

    from autobahn.twisted.websocket import WebSocketClientFactory

    client = WSClient()
    factory = WebSocketClientFactory(f"wss://127.0.0.1:{daemon.port}/websocket?channel=secure")
    factory.protocol = WSClientProtocol
    factory.client = client
    factory.setProtocolOptions(failByDrop=False, closeHandshakeTimeout=2)
    options = ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust)
    await SSL4ClientEndpoint(reactor, "127.0.0.1", daemon.port, options).connect(factory)
    await client.opened
    daemon.clients.append(client)
    await client.next_of("welcome")
    await client.next_of("subscribed")

    response = await treq.client.HTTPClient(agent).post(
        url + "/publish", json={"channel": "secure", "data": "over tls"}
    )
    assert response.code == 200
    await response.content()
    assert (await client.next_of("message"))["data"] == "over tls"
    await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_json_logs_for_log_shippers():
    proc = spawn(
        ["-n", "--pidfile=", "--logger", "pushie.logs.json_observer", "pushie", "--listen", "tcp:0:interface=127.0.0.1"]
    )
    try:
        await wait_for(lambda: b"Pushie listening" in proc.output or proc.ended.called, timeout=20)
    finally:
        assert await stop(proc) == 0
    lines = [line for line in proc.output.decode().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    listening = [e for e in events if "Pushie listening" in e.get("log_format", "")]
    assert listening and listening[0]["log_level"]["name"] == "info"
    assert listening[0]["log_namespace"] == "pushie"
    assert any(e["log_level"]["name"] == "warn" and "OPEN" in e["log_format"] for e in events)


@pytest_twisted.ensureDeferred
async def test_systemd_socket_activation():
    if not shutil.which("systemd-socket-activate"):
        reason = "needs systemd-socket-activate (Debian's systemd package)"
        if os.environ.get("PUSHIE_REQUIRE_SYSTEMD") == "1":
            pytest.fail(reason + " and PUSHIE_REQUIRE_SYSTEMD=1 is set")
        pytest.skip(reason)
    port = free_port()
    from tests.test_daemon import BIN

    proc = spawn(
        [
            "-l",
            f"127.0.0.1:{port}",
            "--fdname=pushie",
            "-E",
            "PYTHONPATH",
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "pushie",
            "--listen",
            "systemd:domain=INET:name=pushie",
        ],
        executable=shutil.which("systemd-socket-activate"),
    )
    pool = HTTPConnectionPool(reactor, persistent=False)

    def bound() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        await wait_for(bound, timeout=10)
        # The socket is systemd-socket-activate's: the first connection starts the daemon.
        response = await treq.post(f"http://127.0.0.1:{port}/publish", json={"channel": "c", "data": 1}, pool=pool)
        assert response.code == 200
        assert json.loads(await response.content())["offset"] == 1
    finally:
        await pool.closeCachedConnections()
        code = await stop(proc)
    assert code == 0, proc.output.decode()


def test_readme_settings_reference_is_generated():
    """README's settings table is the one the option definitions produce: it cannot drift."""
    assert settings_reference() in README.read_text()

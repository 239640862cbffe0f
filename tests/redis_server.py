"""A throwaway redis-server for the tests, on a free port, with nothing on disk (or an append-only file, if asked)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process the tests can stop and start again on the same port."""

    def __init__(self, directory: str, appendonly: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "everysec",
                "--dir",
                self.directory,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.cli("PING").strip() == "PONG":
                    return
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def cli(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout


def require_redis() -> None:
    """Skip without redis-server, or fail when PUSHIE_REQUIRE_REDIS=1 (as in CI)."""
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return
    reason = "these tests need redis-server and redis-cli (apt-get install redis-server)"
    if os.environ.get("PUSHIE_REQUIRE_REDIS") == "1":
        pytest.fail(reason + " and PUSHIE_REQUIRE_REDIS=1 is set")
    pytest.skip(reason)

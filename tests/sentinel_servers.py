"""
A Redis primary, its replica and three sentinels for the tests, each a
process of its own on a free port with its files in a temporary folder; the
primary can be killed (-9) to make the sentinels fail over.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.redis_server import free_port

SERVICE = "pushie"


def _cli(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout


def _wait(what: str, predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except subprocess.SubprocessError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not within {timeout} s")


class SentinelSetup:
    """
    A primary, a replica of it, and three sentinels watching them (quorum 2,
    down after C{down_after} ms), started by L{start} and ended by L{stop}.
    """

    def __init__(self, directory: str, down_after: int = 1000, failover_timeout: int = 5000) -> None:
        self.directory = directory
        self.down_after = down_after
        self.failover_timeout = failover_timeout
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def _spawn(self, name: str, args: list[str]) -> None:
        folder = os.path.join(self.directory, name)
        os.makedirs(folder, exist_ok=True)
        self.processes[name] = subprocess.Popen(
            ["redis-server", *args, "--dir", folder] if args[0] != "--sentinel" else ["redis-server", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=folder,
        )

    def _server(self, name: str, port: int, *extra: str) -> None:
        self._spawn(name, ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra])
        _wait(f"redis-server {name}", lambda: _cli(port, "PING").strip() == "PONG")

    @property
    def primary_url(self) -> str:
        """The first primary, directly (no Sentinel)."""
        return f"redis://127.0.0.1:{self.primary_port}/0"

    def start(self, sentinels: bool = True) -> None:
        """Start the primary and the replica, and (unless told not to) the sentinels."""
        self._server("primary", self.primary_port)
        self._server("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
        _wait("replica in sync", lambda: "master_link_status:up" in _cli(self.replica_port, "INFO", "replication"))
        if not sentinels:
            return
        for i, port in enumerate(self.sentinel_ports):
            folder = os.path.join(self.directory, f"sentinel{i}")
            os.makedirs(folder, exist_ok=True)
            config = os.path.join(folder, "sentinel.conf")
            with open(config, "w") as f:
                f.write(
                    f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} {self.down_after}\n"
                    f"sentinel failover-timeout {SERVICE} {self.failover_timeout}\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n"
                )
            self._spawn(f"sentinel{i}", [config, "--sentinel"])
        for port in self.sentinel_ports:
            _wait(f"sentinel {port}", lambda p=port: _cli(p, "PING").strip() == "PONG")
        # Ready to fail over once every sentinel knows the replica and the two other sentinels.
        for port in self.sentinel_ports:
            _wait("sentinel knows the replica", lambda p=port: str(self.replica_port) in self.sentinel(p, "replicas"))
            _wait(
                "sentinel knows the others",
                lambda p=port: self.sentinel(p, "sentinels").count("127.0.0.1") == 2,
            )

    def sentinel(self, port: int, *args: str) -> str:
        return _cli(port, "SENTINEL", *args, SERVICE) if len(args) == 1 else _cli(port, "SENTINEL", *args)

    def primary_address(self) -> tuple[str, int]:
        host, port = _cli(self.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name", SERVICE).split()
        return host, int(port)

    def cli(self, port: int, *args: str) -> str:
        return _cli(port, *args)

    def cut_off_replica(self) -> None:
        """
        Stop the replica (SIGSTOP) and close its link on the primary: what
        the primary is written from now on, the replica never gets (its
        buffered bytes are all it will read), as when replication lags.
        """
        os.kill(self.processes["replica"].pid, signal.SIGSTOP)
        _cli(self.primary_port, "CLIENT", "KILL", "TYPE", "replica")

    def resume_replica(self) -> None:
        os.kill(self.processes["replica"].pid, signal.SIGCONT)

    def kill_primary(self) -> None:
        """kill -9 the first primary: no goodbye to its clients, what the replica lacks is lost."""
        process = self.processes.pop("primary")
        process.kill()
        process.wait(10)

    def stop(self) -> None:
        if "replica" in self.processes:
            os.kill(self.processes["replica"].pid, signal.SIGCONT)
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

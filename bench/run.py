"""
Pushie's benchmark suite: every scenario against Pushie and against the other
targets in the same invocation, so that every Pushie figure is also a ratio
to each of them: a minimal Twisted + Autobahn broadcast server
(bench/baseline_server.py), the peers Node `ws` (bench/node/server.js) and
Nchan (nginx with its module, one worker, a config written here), and Pushie
as 2 workers sharing its port (`reuseport:`) on a Redis engine.

    bench/setup-peers                        # once: installs Nchan and ws
    python bench/run.py fanout-1k            # one scenario, every target
    python bench/run.py fanout-1k latency --quick --server pushie,nchan
    python bench/run.py --all --quick        # everything, about 15 minutes on 2 cores
    python bench/run.py --list

A peer that is not installed gets "not installed" in its column (and
--require-peers makes that an error).  Each run starts the server(s) as a
subprocess (Pushie: `twistd -n pushie` with every limit off; a
`redis-server` on a free port where Redis is needed), connects the
subscribers from several load-generator processes (bench/loadgen.py: epoll,
raw sockets, hand-made WebSocket handshake and frame parsing), publishes over
keep-alive HTTP from other processes, waits until every message has arrived,
stops everything and reports: the scenario's figure, publish-to-receive
latency percentiles, the server's CPU and the load generators' CPU over the
measured window (from /proc/PID/stat), and the lost and duplicated messages
(counted per connection from the envelope offsets, or for Nchan, which sends
bare bodies, from the counts; both must be 0, else the exit status is 1).
Results go to bench/results/<timestamp>.json and .md, and the markdown
tables are printed.

Loopback only; messages carry about 100 bytes of data.  Needs only Twisted,
Autobahn and the standard library (redis-server for `redis-fanout`,
`redis-shards`, the cluster scenarios and the 2-worker target; the peers for
theirs).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

import loadgen  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The targets of a run, in the table's order.  Pushie; Pushie alone on a
# Redis engine and as 2 workers sharing the port (SO_REUSEPORT, `reuseport:`
# endpoint) on a Redis engine, so that 2 workers compare with 1 on the same
# engine; the Twisted + Autobahn baseline; the peers, Node `ws` and Nchan
# (installed by bench/setup-peers).
SERVERS = ("pushie", "pushie-redis", "pushie-2w", "baseline", "node", "nchan")
PEERS = ("node", "nchan")
NODE_SERVER = os.path.join(BENCH, "node", "server.js")
NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"
# What a target cannot run, and says so in its column instead of a figure.
NOT_APPLICABLE = {
    ("nchan", "batch"): "n/a: Nchan has no batch publish",
    ("pushie-2w", "memory"): "n/a: connections split over 2 processes",
    ("pushie-2w", "redis-fanout"): "n/a: already 2 processes on Redis",
    ("pushie-redis", "redis-fanout"): "n/a: Pushie's column is 2 daemons on Redis",
}


def missing(kind: str) -> str | None:
    """Why a peer cannot run here (then its column says so), or None."""
    if kind == "node":
        if not shutil.which("node"):
            return "not installed: node (run bench/setup-peers)"
        if not os.path.isdir(os.path.join(BENCH, "node", "node_modules", "ws")):
            return "not installed: ws (run bench/setup-peers)"
    if kind == "nchan" and not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        return "not installed: nginx (run bench/setup-peers)"
    if kind == "nchan" and not os.path.exists(NCHAN_MODULE):
        return "not installed: libnginx-mod-nchan (run bench/setup-peers)"
    if kind in ("pushie-2w", "pushie-redis") and not shutil.which("redis-server"):
        return "needs redis-server"
    return None


NGINX_CONF = """\
# Nchan for Pushie's bench, written by bench/run.py: one worker, no logs.
load_module {module};
worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections {connections}; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  keepalive_requests 100000000;
  server {{
    listen 127.0.0.1:{port} backlog=511;
    location ~ ^/sub/(.+)$ {{
      nchan_subscriber websocket;
      nchan_channel_id $1;
      nchan_subscriber_first_message newest;
    }}
    location ~ ^/pub/(.+)$ {{
      nchan_publisher;
      nchan_channel_id $1;
    }}
  }}
}}
"""


def nginx_worker(master: int, timeout: float = 10) -> int:
    """The pid of the nginx master's (only) worker process: the one that serves, measured like the others."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{master}/task/{master}/children") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:
            children = []
        if children:
            return children[0]
        time.sleep(0.05)
    raise RuntimeError("nginx started no worker process")


# -- processes -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_times(pid: int) -> tuple[float, float]:
    """utime and stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    return sum(cpu_times(pid))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


_PROC_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_ticks() -> list[int]:
    """The machine's CPU time by kind (the first fields of /proc/stat's cpu line), in clock ticks."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1 : 1 + len(_PROC_STAT_FIELDS)]]


def other_processes_cpu(ours: set[int]) -> dict[int, float]:
    """CPU seconds of every user-space process that is not ours (kernel threads left out)."""
    seconds = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in ours:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if fields[1] in ("0", "2") and name != "1":  # kthreadd's children
            continue
        seconds[int(name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


class CPUWindow:
    """CPU seconds used by groups of processes between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.before = {pid: cpu_times(pid) for pids in self.groups.values() for pid in pids}
        self.machine_before = machine_ticks()
        self.ours = {os.getpid(), *self.before}
        self.others_before = other_processes_cpu(self.ours)

    def stop(self) -> dict[str, Any]:
        """Percent of one core, per group, over the window (and user/system split: `<group>_user`, `<group>_system`)."""
        after = {pid: cpu_times(pid) for pid in self.before}
        machine = machine_ticks()
        wall = time.monotonic() - self.t0
        self.wall = wall
        result: dict[str, Any] = {}
        for name, pids in self.groups.items():
            user = sum(after[p][0] - self.before[p][0] for p in pids)
            system = sum(after[p][1] - self.before[p][1] for p in pids)
            result[name] = round(100 * (user + system) / wall, 1)
            result[name + "_user"] = round(100 * user / wall, 1)
            result[name + "_system"] = round(100 * system / wall, 1)
            if name == "server" and len(pids) > 1:
                result["server_each"] = [round(100 * (sum(after[p]) - sum(self.before[p])) / wall, 1) for p in pids]
        # The whole machine (nice: the load generators), softirq included: on
        # loopback, much of the network work is done there, billed to no process.
        result["machine"] = {
            name: round(100 * (now - then) / CLOCK_TICKS / wall, 1)
            for name, now, then in zip(_PROC_STAT_FIELDS, machine, self.machine_before, strict=True)
        }
        # CPU that processes other than ours used meanwhile (another test run on
        # a shared machine, say): such figures are disturbed.
        others = other_processes_cpu(self.ours)
        used = sum(t - self.others_before.get(pid, 0.0) for pid, t in others.items())
        result["other_processes"] = round(100 * used / wall, 1)
        return result


class Server:
    """One server process: a Pushie daemon, the baseline, a peer (node, nchan), or redis-server."""

    def __init__(self, kind: str, logdir: str, name: str, engine: str | None = None, port: int | None = None) -> None:
        self.kind = kind
        self.port = port or free_port()
        self.log_path = os.path.join(logdir, f"{name}.log")
        if kind in ("pushie", "pushie-worker"):
            twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
            command = (
                [twistd]
                if os.path.exists(twistd)
                else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
            )
            # A worker shares its port with the others (SO_REUSEPORT).
            listen = "reuseport" if kind == "pushie-worker" else "tcp"
            command += [
                "-n", "--pidfile=", "pushie",
                "--listen", f"{listen}:{self.port}:interface=127.0.0.1",
                "--max-connections", "0", "--max-connections-per-ip", "0",
                "--publish-rate", "0", "--max-subscriptions", "0",
            ]  # fmt: skip
            if engine:
                # A loaded 2-core machine can keep Redis from answering within the
                # default 2 s while 10,000 clients subscribe: not what is measured.
                command += ["--engine", engine, "--redis-timeout", "10"]
        elif kind == "baseline":
            command = [sys.executable, os.path.join(BENCH, "baseline_server.py"), "--port", str(self.port)]
        elif kind == "node":
            command = ["node", NODE_SERVER, "--port", str(self.port)]
        elif kind == "nchan":
            directory = os.path.join(logdir, name)
            os.makedirs(directory, exist_ok=True)
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            conf = os.path.join(directory, "nginx.conf")
            with open(conf, "w") as f:
                f.write(
                    NGINX_CONF.format(
                        module=NCHAN_MODULE,
                        nofile=nofile,
                        connections=max(1024, nofile - 100),
                        dir=directory,
                        port=self.port,
                    )  # fmt: skip
                )
            command = [shutil.which("nginx") or "/usr/sbin/nginx", "-c", conf, "-p", directory]
        elif kind == "redis":
            command = [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", logdir,
            ]  # fmt: skip
        else:
            raise ValueError(kind)
        env = dict(os.environ, PYTHONPATH=CHECKOUT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=logdir
        )
        self.pid = self.process.pid
        self._wait_ready()
        if kind == "nchan":
            self.pid = nginx_worker(self.process.pid)  # measured: the worker, not the idle master

    def _ready(self) -> bool:
        if self.kind == "redis":
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(100).startswith(b"+PONG")
        if self.kind in ("pushie", "pushie-worker"):
            # A worker's port is shared: its own log line says that it listens.
            with open(self.log_path, "rb") as f:
                if b"Pushie listening on" not in f.read():
                    return False
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                connection.request("GET", "/healthz")
                return connection.getresponse().status == 200
            finally:
                connection.close()
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        return True

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start-up ({self.process.returncode}); see {self.log_path}")
            try:
                if self._ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} did not start; see {self.log_path}")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


class Cluster:
    """
    The server side of one run: one Pushie (or several on a redis-server), two
    Pushie workers sharing one port on a redis-server, the baseline or a peer.

    C{redis}: a redis-server the scenario started for all its runs (the
    cluster scenarios compare several daemons with one on the same Redis);
    it is flushed first and left running.  Without it, several nodes get a
    redis-server of their own.  With C{shards}, the Pushie daemons use that
    many redis-servers of their own as shards (one shard: a plain C{redis://} URL).
    """

    def __init__(
        self, kind: str, logdir: str, name: str, nodes: int = 1, shards: int = 0, redis: Server | None = None
    ) -> None:
        self.servers: list[Server] = []
        self.redis: Server | None = redis
        self.redis_servers: list[Server] = []
        try:
            engine = None
            if kind == "pushie" and redis is not None:
                flush(redis)
                engine = f"redis://127.0.0.1:{redis.port}/0"
            elif kind in ("pushie-2w", "pushie-redis") or (kind == "pushie" and (nodes > 1 or shards)):
                for i in range(max(1, shards)):
                    self.redis_servers.append(Server("redis", logdir, f"{name}-redis{i}"))
                engine = ",".join(f"redis://127.0.0.1:{r.port}/0" for r in self.redis_servers)
            if kind == "pushie-2w":
                port = free_port()
                for i in range(2):
                    self.servers.append(Server("pushie-worker", logdir, f"{name}-worker{i}", engine, port))
                return
            if kind == "pushie-redis":
                self.servers.append(Server("pushie", logdir, f"{name}-pushie", engine))
                return
            for i in range(nodes if kind == "pushie" else 1):
                self.servers.append(Server(kind, logdir, f"{name}-{kind}{i if nodes > 1 else ''}", engine))
        except BaseException:
            self.stop()
            raise

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        for redis in self.redis_servers:
            redis.stop()


def flush(redis: Server) -> None:
    """FLUSHALL on a redis-server of ours (between the runs of a scenario that share it)."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=10) as s:
        s.sendall(b"FLUSHALL\r\n")
        if not s.recv(100).startswith(b"+OK"):
            raise RuntimeError("FLUSHALL failed")


class Workers:
    """Load-generator processes (bench/loadgen.py), driven over pipes."""

    def __init__(self, count: int, kind: str = "subscriber", **options: Any) -> None:
        context = multiprocessing.get_context("fork")
        self.pipes = []
        self.processes = []
        for index in range(count):
            parent, child = context.Pipe()
            process = context.Process(target=loadgen.worker_main, args=(child, kind, index, options), daemon=True)
            process.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def __len__(self) -> int:
        return len(self.processes)

    def send(self, index: int, command: str, **kwargs: Any) -> None:
        self.pipes[index].send((command, kwargs))

    def receive(self, index: int, timeout: float = 120) -> Any:
        pipe = self.pipes[index]
        if not pipe.poll(timeout):
            raise RuntimeError(f"load generator {index} did not answer within {timeout} s")
        status, value = pipe.recv()
        if status != "ok":
            raise RuntimeError(f"load generator {index} failed:\n{value}")
        return value

    def all(
        self, command: str, per_worker: list[dict[str, Any]] | None = None, timeout: float = 120, **kwargs: Any
    ) -> list[Any]:
        """Run a command in every worker at once (each with its own arguments, if given)."""
        for i in range(len(self)):
            self.send(i, command, **(per_worker[i] if per_worker else kwargs))
        return [self.receive(i, timeout) for i in range(len(self))]

    def close(self) -> None:
        for i, process in enumerate(self.processes):
            if process.is_alive():
                try:
                    self.send(i, "close")
                    self.receive(i, 10)
                except (OSError, RuntimeError, EOFError):
                    pass
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()


# -- measuring -------------------------------------------------------------------


def percentiles(raw: list[bytes], scale: float = 1e-6) -> dict[str, float] | None:
    """p50/p90/p99/max of arrays of nanoseconds, in milliseconds."""
    values = array("q")
    for chunk in raw:
        values.frombytes(chunk)
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))] * scale, 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1] * scale, 3), "samples": n}


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts)]


def merge_finals(results: list[dict[str, Any]]) -> dict[str, int]:
    finals: dict[str, int] = {}
    for r in results:
        for channel, offset in r["finals"].items():
            finals[channel] = max(offset, finals.get(channel, 0))
    return finals


def subscribe(workers: Workers, targets: list[tuple[int, str]], concurrency: int = 10, raw: bool = False) -> float:
    """Connect every (port, channel) subscriber, spread over the workers; the time it took (raw: Nchan's URLs)."""
    started = time.monotonic()
    results = workers.all(
        "subscribe",
        [{"targets": t, "concurrency": concurrency, "raw": raw} for t in split(targets, len(workers))],
        timeout=300,
    )
    failed: Counter[str] = Counter()
    for r in results:
        failed.update(r["failed"])
    if failed:
        raise RuntimeError(f"{sum(failed.values())} of {len(targets)} subscribers failed: {dict(failed)}")
    return time.monotonic() - started


def drain(workers: Workers, finals: dict[str, int], timeout: float = 60, stall: float = 5) -> None:
    """Wait until every subscriber has every message, or nothing arrives for `stall` seconds."""
    deadline = time.monotonic() + timeout
    seen, seen_at = -1, time.monotonic()
    while time.monotonic() < deadline:
        progress = workers.all("progress", finals=finals)
        unique = sum(p["unique"] for p in progress)
        if unique >= sum(p["expected"] for p in progress):
            return
        if unique != seen:
            seen, seen_at = unique, time.monotonic()
        elif time.monotonic() - seen_at > stall:
            return
        time.sleep(0.1)


def collect(workers: Workers, finals: dict[str, int]) -> dict[str, Any]:
    results = workers.all("finish", finals=finals)
    errors: Counter[str] = Counter()
    close_codes: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
        close_codes.update(r["close_codes"])
    return {
        "deliveries": sum(r["unique"] for r in results),
        "expected_deliveries": sum(r["expected"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "first_receive_ns": min((r["first_receive_ns"] for r in results if r["first_receive_ns"]), default=0),
        "last_receive_ns": max(r["last_receive_ns"] for r in results),
        "latency_ms": percentiles([r["latencies_ns"] for r in results]),
        "subscriber_errors": dict(errors),
        "close_codes": dict(close_codes),
    }


class Run:
    """Everything one scenario needs for one server kind; torn down by close()."""

    def __init__(
        self,
        kind: str,
        options: argparse.Namespace,
        name: str,
        nodes: int = 1,
        shards: int = 0,
        redis: Server | None = None,
    ) -> None:
        self.kind = kind
        self.raw = kind == "nchan"  # Nchan's URLs and bare message bodies (see loadgen)
        self.options = options
        self.cluster: Cluster | None = None
        self.subscribers: Workers | None = None
        self.publishers: Workers | None = None
        self.cluster = Cluster(kind, options.logdir, name, nodes, shards, redis)

    def workers(self, subscribers: int, publishers: int, nap: float = 0.0) -> None:
        """
        Start the load generators: subscriber processes (epoll) and publisher
        processes (asyncio), which share their counts of messages received and
        published (for the publishers' window).
        """
        context = multiprocessing.get_context("fork")
        delivered = context.RawArray("q", max(1, subscribers))
        published = context.RawArray("q", max(1, publishers))
        self.subscribers = Workers(subscribers, "subscriber", delivered=delivered, nap=nap) if subscribers else None
        self.publishers = (
            Workers(publishers, "client", delivered=delivered, published=published) if publishers else None
        )

    def cpu_window(self) -> CPUWindow:
        assert self.cluster is not None
        groups = {"server": self.cluster.pids}
        if self.cluster.redis_servers:
            groups["redis"] = [r.pid for r in self.cluster.redis_servers]
        groups["loadgen"] = (self.subscribers.pids if self.subscribers else []) + (
            self.publishers.pids if self.publishers else []
        )
        return CPUWindow(groups)

    def close(self) -> dict[str, Any]:
        # Clients go first (RST), so that the servers have nobody to say goodbye to.
        for workers in (self.subscribers, self.publishers):
            if workers is not None:
                workers.close()
        exits = {}
        if self.cluster is not None:
            self.cluster.stop()
            exits = {f"{s.kind}{i}": s.process.returncode for i, s in enumerate(self.cluster.servers)}
        return {"server_exit": exits}


def deliveries_run(
    kind: str,
    options: argparse.Namespace,
    name: str,
    *,
    subscribers: list[tuple[int, str]],
    channels: list[str],
    duration: float,
    publishers: int = 1,
    concurrency: int = 4,
    rate: float | None = None,
    batch: int = 0,
    nodes: int = 1,
    nap: float | None = None,
    window: int | None = None,
    shards: int = 0,
    publish_to_every_node: bool = False,
    redis: Server | None = None,
    spread_publishers: bool = False,
) -> dict[str, Any]:
    """
    Connect `subscribers` ((node index, channel) pairs), publish to `channels`
    on node 0 for `duration` seconds, wait until everything has arrived, count.
    `window`: how many messages the publishers may be ahead of the subscribers.
    `publish_to_every_node`: publisher process i posts its share of the
    channels to node i (round robin).  `spread_publishers`: publisher process
    i publishes to node i, to every channel (else the channels are split).
    `shards`: Redis servers for the daemons (see Cluster).  `redis`: a
    redis-server shared by the scenario's runs.
    """
    run = Run(kind, options, name, nodes, shards, redis)
    try:
        assert run.cluster is not None
        run.workers(options.workers, publishers, options.nap / 1000 if nap is None else nap)
        assert run.subscribers is not None and run.publishers is not None
        ports = run.cluster.ports
        connect_seconds = subscribe(
            run.subscribers, [(ports[node % len(ports)], ch) for node, ch in subscribers], raw=run.raw
        )
        cpu_window = run.cpu_window()
        cpu_window.start()
        published = run.publishers.all(
            "publish",
            [
                {
                    "port": ports[index % len(ports)] if (publish_to_every_node or spread_publishers) else ports[0],
                    "channels": part,
                    "duration": duration,
                    "concurrency": concurrency,
                    "rate": rate / publishers if rate else None,
                    "batch": batch,
                    "window": window,
                    "per_message": len(subscribers) / len(channels),
                    "raw": run.raw,
                }
                for index, part in enumerate(
                    [channels] * publishers if spread_publishers else split(channels, publishers)
                )
            ],
            timeout=duration + 120,
        )
        finals = merge_finals(published)
        drain(run.subscribers, finals)
        cpu = cpu_window.stop()
        counts = collect(run.subscribers, finals)
    finally:
        teardown = run.close()
    statuses: Counter[str] = Counter()
    for p in published:
        statuses.update(p["statuses"])
    start_ns = min(p["start_ns"] for p in published)
    publish_seconds = (max(p["end_ns"] for p in published) - start_ns) / 1e9
    deliver_seconds = (counts["last_receive_ns"] - start_ns) / 1e9 if counts["last_receive_ns"] else 0.0
    messages = sum(p["published"] for p in published)
    return {
        "nodes": len(ports),
        "subscribers": len(subscribers),
        "subscribers_per_node": [sum(1 for n, _ in subscribers if n % len(ports) == i) for i in range(len(ports))],
        "publishing_to": "every node" if spread_publishers and len(ports) > 1 else "node 0",
        "channels": len(channels),
        "connect_seconds": round(connect_seconds, 2),
        "messages": messages,
        "requests": sum(p["requests"] for p in published),
        "statuses": dict(statuses),
        "publish_seconds": round(publish_seconds, 3),
        "messages_per_second": round(messages / publish_seconds, 1) if publish_seconds else None,
        "deliveries_per_second": round(counts["deliveries"] / deliver_seconds, 1) if deliver_seconds else None,
        "publish_rtt_ms": percentiles([p["rtts_ns"] for p in published]),
        "cpu_percent": cpu,
        "window_seconds": round(cpu_window.wall, 2),
        **counts,
        **teardown,
    }


# -- scenarios -------------------------------------------------------------------


def d(options: argparse.Namespace, full: float, quick: float) -> float:
    return quick if options.quick else full


def fanout(subscribers: int) -> Callable[[str, argparse.Namespace, str], dict[str, Any]]:
    def scenario(kind: str, options: argparse.Namespace, name: str) -> dict[str, Any]:
        result = deliveries_run(
            kind, options, name,
            subscribers=[(0, "fan")] * subscribers, channels=["fan"],
            duration=d(options, 10, 3), concurrency=8, window=16,
        )  # fmt: skip
        result["value"] = result["deliveries_per_second"]
        return result

    return scenario


def latency(kind: str, options: argparse.Namespace, name: str) -> dict[str, Any]:
    result = deliveries_run(
        kind, options, name,
        subscribers=[(0, "lat")] * 1000, channels=["lat"],
        duration=d(options, 15, 4), concurrency=1, rate=20, nap=0.0,
    )  # fmt: skip
    result["value"] = result["latency_ms"]["p99"] if result["latency_ms"] else None
    return result


def many_channels(batch: int) -> Callable[[str, argparse.Namespace, str], dict[str, Any]]:
    def scenario(kind: str, options: argparse.Namespace, name: str) -> dict[str, Any]:
        channels = [f"c{i}" for i in range(10000)]
        result = deliveries_run(
            kind, options, name,
            subscribers=[(0, c) for c in channels], channels=channels,
            duration=d(options, 10, 3), publishers=2, concurrency=2 if batch else 8, batch=batch,
            window=2000 if batch else 1000,
        )  # fmt: skip
        result["value"] = result["messages_per_second"]
        return result

    return scenario


def memory(kind: str, options: argparse.Namespace, name: str) -> dict[str, Any]:
    n = 10000
    run = Run(kind, options, name)
    try:
        assert run.cluster is not None
        run.workers(options.workers, 1)
        assert run.subscribers is not None and run.publishers is not None
        port = run.cluster.ports[0]
        pid = run.cluster.pids[0]
        # Warm up the code paths (handshake, subscribe, publish), then measure.
        warm = Workers(1)
        # Nchan has no batches: single publishes there, as many messages.
        per_request = 1 if run.raw else 100
        try:
            subscribe(warm, [(port, f"w{i}") for i in range(10)], raw=run.raw)
            run.publishers.all(
                "publish", port=port, channels=[f"w{i}" for i in range(10)], count=20 if run.raw else 2,
                batch=0 if run.raw else 10, raw=run.raw,
            )  # fmt: skip
        finally:
            warm.close()
        time.sleep(1)
        before = rss_bytes(pid)
        channels = [f"m{i}" for i in range(n)]
        connect_seconds = subscribe(run.subscribers, [(port, c) for c in channels], raw=run.raw)
        time.sleep(2)
        after = rss_bytes(pid)
        # Then one message to each of them, to check that they all work.
        published = run.publishers.all(
            "publish", port=port, channels=channels, count=n // per_request, concurrency=2,
            batch=0 if run.raw else 100, raw=run.raw,
        )  # fmt: skip
        finals = merge_finals(published)
        drain(run.subscribers, finals)
        counts = collect(run.subscribers, finals)
    finally:
        teardown = run.close()
    per_connection = (after - before) / n
    return {
        "connections": n,
        "connect_seconds": round(connect_seconds, 2),
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_connection": round(per_connection),
        "value": round(per_connection / 1024, 2),
        "messages": sum(p["published"] for p in published),
        "statuses": dict(sum((Counter(p["statuses"]) for p in published), Counter())),
        **counts,
        **teardown,
    }


def handshakes(kind: str, options: argparse.Namespace, name: str) -> dict[str, Any]:
    run = Run(kind, options, name)
    try:
        assert run.cluster is not None
        run.workers(0, options.workers)
        assert run.publishers is not None
        window = run.cpu_window()
        window.start()
        results = run.publishers.all(
            "handshakes", port=run.cluster.ports[0], channel="hs", duration=d(options, 10, 3), concurrency=8,
            raw=run.raw,
        )  # fmt: skip
        cpu = window.stop()
    finally:
        teardown = run.close()
    ok = sum(r["ok"] for r in results)
    failed: Counter[str] = Counter()
    for r in results:
        failed.update(r["failed"])
    seconds = (max(r["end_ns"] for r in results) - min(r["start_ns"] for r in results)) / 1e9
    return {
        "handshakes": ok,
        "failed": dict(failed),
        "seconds": round(seconds, 3),
        "value": round(ok / seconds, 1),
        "handshake_ms": percentiles([r["times_ns"] for r in results]),
        "cpu_percent": cpu,
        "lost": None,  # no messages in this scenario
        "duplicated": None,
        "errors": sum(failed.values()),
        **teardown,
    }


def redis_fanout(kind: str, options: argparse.Namespace, name: str) -> dict[str, Any]:
    n = 1000
    result = deliveries_run(
        kind, options, name,
        subscribers=[(i % 2, "fan") for i in range(n)], channels=["fan"],
        duration=d(options, 10, 3), concurrency=8, nodes=2, window=16,
    )  # fmt: skip
    result["value"] = result["deliveries_per_second"]
    return result


def redis_shards(kind: str, options: argparse.Namespace, name: str) -> dict[str, Any]:
    """
    Two daemons on one Redis, then on two Redis shards, in the same run:
    fan-out over many channels (200 channels x 5 subscribers) and single
    publishes to many channels (4,000 channels x 1 subscriber), publishers
    posting to both daemons.  The figure is the ratio two shards / one shard
    of the single publishes; the fan-out ratio is in the JSON and printed.
    The baseline has no Redis: it is not run.
    """
    if kind != "pushie":
        return {"value": None, "lost": None, "note": "no baseline: the ratios are Pushie two shards / one shard"}
    measures = {
        "fanout": {
            "channels": [f"f{i}" for i in range(200)],
            "per_channel": 5,
            "publishers": 2,
            "concurrency": 8,
            "window": 400,
            "figure": "deliveries_per_second",
        },
        "publishes": {
            "channels": [f"p{i}" for i in range(4000)],
            "per_channel": 1,
            "publishers": 2,
            "concurrency": 8,
            "window": 1000,
            "figure": "messages_per_second",
        },
    }
    result: dict[str, Any] = {"runs": {}}
    for measure, m in measures.items():
        figures = {}
        for shards in (1, 2):
            channels = m["channels"]
            subscribers = [(i % 2, c) for i, c in enumerate(c for c in channels for _ in range(m["per_channel"]))]
            run = deliveries_run(
                kind, options, f"{name}-{measure}-{shards}",
                subscribers=subscribers, channels=channels, duration=d(options, 10, 3),
                publishers=m["publishers"], concurrency=m["concurrency"], window=m["window"],
                nodes=2, shards=shards, publish_to_every_node=True,
            )  # fmt: skip
            result["runs"][f"{measure}-{shards}-shard"] = run
            figures[shards] = run[m["figure"]]
        result[f"{measure}_one_shard"] = figures[1]
        result[f"{measure}_two_shards"] = figures[2]
        result[f"{measure}_ratio"] = ratio(figures[2], figures[1])
        print(
            f"\n    {measure} ({m['figure']}): 1 shard {fmt(figures[1])}, 2 shards {fmt(figures[2])}, "
            f"ratio {fmt(result[f'{measure}_ratio'])}",
            end="",
            flush=True,
        )
    print(" ->", end=" ", flush=True)
    runs = list(result["runs"].values())
    result["lost"] = sum(r["lost"] for r in runs)
    result["duplicated"] = sum(r["duplicated"] for r in runs)
    statuses: Counter[str] = Counter()
    for r in runs:
        statuses.update(r["statuses"])
        for key in ("subscriber_errors", "close_codes"):
            for k, v in r.get(key, {}).items():
                result.setdefault(key, {})[k] = result.get(key, {}).get(k, 0) + v
    result["statuses"] = dict(statuses)
    # The figure is the single publishes' ratio; CPU and latency of its two-shard run for the table.
    result["cpu_percent"] = result["runs"]["publishes-2-shard"]["cpu_percent"]
    result["latency_ms"] = result["runs"]["publishes-2-shard"]["latency_ms"]
    result["value"] = result["publishes_ratio"]
    return result


def shared_redis(options: argparse.Namespace, name: str) -> Server:
    """The scenario's redis-server, started by its first run; main() stops it when the scenario is done."""
    if options.shared_redis is None:
        options.shared_redis = Server("redis", options.logdir, f"{name.rsplit('-', 1)[0]}-redis")
    return options.shared_redis


CLUSTER_NODES = 3


def cluster(spread: bool, latency: bool = False) -> Callable[[str, argparse.Namespace, str], dict[str, Any]]:
    """
    Three Pushie daemons on one redis-server, subscribers spread over them
    round robin (the "pushie" run), against one daemon on the same
    redis-server with all the subscribers (the "baseline" run: no Twisted
    baseline here).  Publishes go to daemon 0, or (C{spread}) one publisher
    process to each daemon.  Max-rate fan-out, or (C{latency}) 5 msg/s
    (7,500 deliveries/s: well within what one daemon delivers, so that the
    figure is the path's latency, not a queue).
    """

    def scenario(kind: str, options: argparse.Namespace, name: str) -> dict[str, Any]:
        nodes = CLUSTER_NODES if kind == "pushie" else 1
        n = 1500
        common: dict[str, Any] = {
            "subscribers": [(i % nodes, "fan") for i in range(n)],
            "channels": ["fan"],
            "nodes": nodes,
            "redis": shared_redis(options, name),
        }
        if latency:
            result = deliveries_run(
                "pushie", options, name, duration=d(options, 15, 4), concurrency=1, rate=5, nap=0.0, **common
            )
            result["value"] = result["latency_ms"]["p99"] if result["latency_ms"] else None
        else:
            result = deliveries_run(
                "pushie", options, name, duration=d(options, 10, 3), window=16, **common,
                publishers=CLUSTER_NODES if spread else 1, concurrency=3 if spread else 8,
                spread_publishers=spread,
            )  # fmt: skip
            result["value"] = result["deliveries_per_second"]
        return result

    return scenario


# name: (function, description, metric, higher is better)
SCENARIOS: dict[str, tuple[Callable[[str, argparse.Namespace, str], dict[str, Any]], str, str, bool]] = {
    "fanout-1k": (fanout(1000), "fan-out, 1,000 subscribers, max rate", "deliveries/s", True),
    "fanout-10k": (fanout(10000), "fan-out, 10,000 subscribers, max rate", "deliveries/s", True),
    "latency": (latency, "1,000 subscribers, 20 msg/s: publish-to-receive", "p99 ms", False),
    "channels-10k": (many_channels(0), "10,000 channels x 1 subscriber, single publishes", "publishes/s", True),
    "batch": (many_channels(100), "10,000 channels x 1 subscriber, batches of 100", "messages/s", True),
    "memory": (memory, "10,000 idle subscribed connections", "KiB RSS/connection", False),
    "handshakes": (handshakes, "WebSocket handshakes (open, subscribe, close)", "handshakes/s", True),
    "redis-fanout": (
        redis_fanout,
        "Redis engine: 2 daemons, 1,000 subscribers over both, publish to one (baseline: 1 process)",
        "deliveries/s",
        True,
    ),
    "redis-shards": (
        redis_shards,
        "Redis shards: 2 daemons on 1 Redis, then on 2 shards; fan-out (200 channels x 5) and single publishes "
        "(4,000 channels), publishing to both daemons (no baseline)",
        "2 shards / 1 shard, publishes/s",
        True,
    ),
    "cluster": (
        cluster(spread=False),
        "Redis engine: 3 daemons, 1,500 subscribers spread over them, publish to one "
        "(baseline column: 1 daemon on the same Redis)",
        "deliveries/s",
        True,
    ),
    "cluster-spread": (
        cluster(spread=True),
        "the same, 3 publishers, one to each daemon (baseline column: all 3 to the 1 daemon)",
        "deliveries/s",
        True,
    ),
    "cluster-latency": (
        cluster(spread=False, latency=True),
        "Redis engine: 3 daemons, 1,500 subscribers, 5 msg/s to one: publish-to-receive "
        "(baseline column: 1 daemon on the same Redis)",
        "p99 ms",
        False,
    ),
}

#: Scenarios whose "baseline" run is Pushie itself in another shape (see their descriptions).
PUSHIE_REFERENCE = {"cluster", "cluster-spread", "cluster-latency"}


def pushie_only(name: str, kind: str) -> str | None:
    """
    The scenarios that compare Pushie with itself (several daemons with one,
    two shards with one) run only in the "pushie" and "baseline" columns.
    """
    if (name in PUSHIE_REFERENCE or name == "redis-shards") and kind not in ("pushie", "baseline"):
        return "n/a: a Pushie-to-Pushie scenario"
    return None


# -- reporting -------------------------------------------------------------------


def ratio(pushie: Any, baseline: Any) -> float | None:
    if not isinstance(pushie, (int, float)) or not isinstance(baseline, (int, float)) or not baseline:
        return None
    return round(pushie / baseline, 2)


def problems(result: dict[str, Any]) -> list[str]:
    """What makes a run invalid: lost or duplicated messages, refused requests, dropped connections."""
    found = []
    if "error" in result:
        return [result["error"].strip().splitlines()[-1]]
    if result.get("lost"):
        found.append(f"{result['lost']} lost")
    if result.get("duplicated"):
        found.append(f"{result['duplicated']} duplicated")
    bad = {k: v for k, v in result.get("statuses", {}).items() if k not in loadgen.PUBLISHED}
    if bad:
        found.append(f"publish answers {bad}")
    if result.get("subscriber_errors"):
        found.append(f"subscriber errors {result['subscriber_errors']}")
    if result.get("close_codes"):
        found.append(f"closed by the server {result['close_codes']}")
    if result.get("failed"):
        found.append(f"failed {result['failed']}")
    return found


def disturbed(result: dict[str, Any]) -> str | None:
    """Why a run's figures may not be representative: other processes, or a hypervisor, took CPU."""
    cpu = result.get("cpu_percent") or {}
    why = []
    if cpu.get("other_processes", 0) > 15:
        why.append(f"other processes used {cpu['other_processes']:g} % of a core")
    steal = (cpu.get("machine") or {}).get("steal", 0)
    if steal > 10:
        why.append(f"the hypervisor stole {steal:g} % of a core")
    return " and ".join(why) + " meanwhile: this figure is disturbed" if why else None


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value >= 1000:
        return f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:g}" if isinstance(value, float) else str(value)


LABELS = {
    "pushie": "Pushie",
    "pushie-redis": "Pushie on Redis",
    "pushie-2w": "Pushie, 2 workers on Redis",
    "baseline": "baseline",
    "node": "Node ws",
    "nchan": "Nchan",
}
# Ratios in the table: Pushie to each other target, and 2 workers to 1 (both on Redis).
RATIOS = (("pushie", "baseline"), ("pushie", "node"), ("pushie", "nchan"), ("pushie-2w", "pushie-redis"))


def ratios(entry: dict[str, Any]) -> dict[str, float | None]:
    return {
        f"{a}/{b}": ratio(entry.get(a, {}).get("value"), entry.get(b, {}).get("value"))
        for a, b in RATIOS
        if a in entry and b in entry
    }


def markdown(report: dict[str, Any]) -> str:
    """Two tables: the figures and ratios, one row per scenario; then the details, one row per scenario and target."""
    kinds = report["servers"]
    shown = [(a, b) for a, b in RATIOS if a in kinds and b in kinds]
    lines = [
        "| scenario | metric | "
        + " | ".join(LABELS[k] for k in kinds)
        + "".join(f" | {LABELS[a]} / {LABELS[b]}" for a, b in shown)
        + " |",
        "|---|---|" + "---|" * (len(kinds) + len(shown)),
    ]
    for name, entry in report["scenarios"].items():
        better = "higher is better" if entry["higher_is_better"] else "lower is better"

        def value(r: dict[str, Any]) -> str:
            if "skipped" in r:
                return r["skipped"]
            if "error" in r or problems(r):
                return f"{fmt(r.get('value'))} (PROBLEMS)"
            return fmt(r.get("value"))

        lines.append(
            f"| {name}: {entry['description']} | {entry['metric']} ({better}) | "
            + " | ".join(value(entry.get(k, {})) for k in kinds)
            + "".join(f" | {fmt(entry['ratios'].get(f'{a}/{b}'))}" for a, b in shown)
            + " |"
        )
    lines += [
        "",
        "| scenario | target | p99 latency ms | server CPU % | load-gen CPU % | machine idle % | lost / dup |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["scenarios"].items():
        for kind in kinds:
            r = entry.get(kind, {})
            if not r or "skipped" in r:
                continue
            c = r.get("cpu_percent") or {}
            server = fmt(c.get("server"))
            if "redis" in c:
                server += f"+{fmt(c['redis'])} redis"
            machine = c.get("machine")
            idle = fmt(round(machine["idle"] / (os.cpu_count() or 1), 1)) if machine else "-"
            lost = "-" if "error" in r or r.get("lost") is None else f"{r['lost']}/{r['duplicated']}"
            p99 = (r.get("latency_ms") or r.get("handshake_ms") or {}).get("p99")
            lines.append(
                f"| {name} | {LABELS[kind]} | {fmt(p99)} | {server} | {fmt(c.get('loadgen'))} | {idle} | {lost} |"
            )
    others = [name for name, entry in report["scenarios"].items() if entry.get("baseline_is")]
    if others:
        lines.append("")
        lines.append(f"In {', '.join(others)} the baseline column is one Pushie daemon on the same redis-server.")
    return "\n".join(lines)


def peer_versions(kinds: tuple[str, ...]) -> dict[str, str | None]:
    """The versions the peers ran with, for the report."""

    def run(*command: str) -> str | None:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return (done.stdout + done.stderr).strip().splitlines()[0] if done.returncode == 0 else None

    versions: dict[str, str | None] = {}
    if "node" in kinds:
        ws = os.path.join(BENCH, "node", "node_modules", "ws", "package.json")
        node = run("node", "--version")
        versions["node"] = node and f"{node}, ws {json.load(open(ws))['version']}" if os.path.exists(ws) else node
    if "nchan" in kinds:
        versions["nchan"] = run("dpkg-query", "-W", "-f=nginx-light ${Version}", "nginx-light")
        nchan = run("dpkg-query", "-W", "-f=libnginx-mod-nchan ${Version}", "libnginx-mod-nchan")
        if nchan:
            versions["nchan"] = f"{versions['nchan']}, {nchan}"
    return versions


def git_revision() -> str | None:
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "pushie", "twisted"], cwd=CHECKOUT, capture_output=True, text=True
        ).stdout
        return revision + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios: " + ", ".join(SCENARIOS),
    )
    parser.add_argument("scenarios", nargs="*", help="scenario names (see --list)")
    parser.add_argument("--all", action="store_true", help="run every scenario")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--quick", action="store_true", help="short measurements (3-4 s instead of 10-15 s)")
    parser.add_argument(
        "--server", default=",".join(SERVERS),
        help=f"targets, comma-separated, from {', '.join(SERVERS)} (default: all; 'both': pushie,baseline)",
    )  # fmt: skip
    parser.add_argument(
        "--require-peers", action="store_true",
        help="fail (status 2) when a peer (node, nchan) is not installed, instead of a 'not installed' column",
    )  # fmt: skip
    parser.add_argument(
        "--setup-peers", action="store_true",
        help="install the peers first (bench/setup-peers: apt-get nginx-light libnginx-mod-nchan, npm ci)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=4, help="subscriber processes (default 4)")
    parser.add_argument(
        "--nap", type=float, default=2.0,
        help="ms a subscriber process sleeps after a busy poll in max-rate runs, so that reads bring several frames",
    )  # fmt: skip
    parser.add_argument("--out", default=os.path.join(BENCH, "results"), help="results directory")
    options = parser.parse_args()
    if options.list:
        for name, (_, description, metric, _) in SCENARIOS.items():
            print(f"{name:14} {description} ({metric})")
        return 0
    names = list(SCENARIOS) if options.all else options.scenarios
    unknown = [n for n in names if n not in SCENARIOS]
    if not names or unknown:
        parser.error(
            f"give --all or scenario names from: {', '.join(SCENARIOS)}" + (f" (unknown: {unknown})" if unknown else "")
        )
    kinds = ("pushie", "baseline") if options.server == "both" else tuple(options.server.split(","))
    unknown_kinds = [k for k in kinds if k not in SERVERS]
    if unknown_kinds:
        parser.error(f"unknown targets {unknown_kinds}: choose from {', '.join(SERVERS)}")
    kinds = tuple(k for k in SERVERS if k in kinds)  # the table's order
    needs_redis = [
        n for n in names if (n in ("redis-fanout", "redis-shards") and "pushie" in kinds) or n in PUSHIE_REFERENCE
    ]
    if needs_redis and not shutil.which("redis-server"):
        parser.error(f"{', '.join(needs_redis)} need redis-server on the PATH")
    if options.setup_peers:
        subprocess.run([os.path.join(BENCH, "setup-peers")], check=True)
    absent = {k: why for k in kinds if (why := missing(k)) is not None}
    if options.require_peers and absent:
        print("; ".join(f"{k}: {why}" for k, why in absent.items()), file=sys.stderr)
        return 2

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers and workers
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(options.out, exist_ok=True)
    options.logdir = tempfile.mkdtemp(prefix=f"pushie-bench-{stamp}-")
    report: dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "revision": git_revision(),
        "quick": options.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "nofile": hard,
        },
        "load_generator": {"subscriber_processes": options.workers, "nap_ms": options.nap},
        "servers": list(kinds),
        "peers": peer_versions(kinds),
        "logs": options.logdir,  # removed at the end unless a run had problems
        "scenarios": {},
    }
    started = time.monotonic()
    failed = False
    warnings: list[str] = []
    for name in names:
        function, description, metric, higher = SCENARIOS[name]
        entry: dict[str, Any] = {"description": description, "metric": metric, "higher_is_better": higher}
        if name in PUSHIE_REFERENCE:
            entry["baseline_is"] = "one Pushie daemon on the same redis-server"
        report["scenarios"][name] = entry
        options.shared_redis = None
        for kind in kinds:
            skipped = absent.get(kind) or NOT_APPLICABLE.get((kind, name)) or pushie_only(name, kind)
            if skipped:
                entry[kind] = {"skipped": skipped}
                print(f"[{time.monotonic() - started:6.1f}s] {name} / {kind}: {skipped}", flush=True)
                continue
            t0 = time.monotonic()
            print(f"[{time.monotonic() - started:6.1f}s] {name} / {kind} ...", end=" ", flush=True)
            try:
                result = function(kind, options, f"{name}-{kind}")
            except Exception as e:  # noqa: BLE001
                import traceback

                result = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
            result["run_seconds"] = round(time.monotonic() - t0, 1)
            entry[kind] = result
            issues = problems(result)
            failed = failed or bool(issues)
            warning = disturbed(result)
            if warning:
                result["warning"] = warning
                warnings.append(f"{name} / {kind}: {warning}")
            line = f"{metric}: {fmt(result.get('value'))}"
            if result.get("lost") is not None:
                received = fmt(result.get("deliveries"))
                line += f"  (lost {result['lost']}, duplicated {result['duplicated']}, {received} received)"
            if issues:
                line += f"  PROBLEMS: {'; '.join(issues)}"
            if warning:
                line += f"  WARNING: {warning}"
            print(line, flush=True)
        if options.shared_redis is not None:
            options.shared_redis.stop()
            options.shared_redis = None
        entry["ratio"] = ratio(entry.get("pushie", {}).get("value"), entry.get("baseline", {}).get("value"))
        entry["ratios"] = ratios(entry)
    report["seconds"] = round(time.monotonic() - started, 1)
    table = markdown(report)
    report["table"] = table
    base = os.path.join(options.out, stamp)
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    if failed:
        print(f"\n{report['seconds']} s; results in {base}.json and .md; server logs in {options.logdir}")
    else:
        shutil.rmtree(options.logdir, ignore_errors=True)
        print(f"\n{report['seconds']} s; results in {base}.json and .md")
    for warning in warnings:
        print("WARNING:", warning)
    if failed:
        print("Some runs had problems (see PROBLEMS above): the figures of those runs do not count.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

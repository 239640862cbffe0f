"""
The load generator's worker processes: raw sockets, no WebSocket or HTTP library.

`bench/run.py` starts several of these (multiprocessing) and drives them over a
pipe with commands such as C{subscribe}, C{publish}, C{handshakes},
C{progress}, C{finish} and C{close}; each answers with a plain dict.  A
L{SubscriberWorker} holds subscriber connections in a plain epoll loop; a
L{ClientWorker} runs publishers or handshake loops on asyncio.

Subscribers do the WebSocket handshake by hand and parse the server's
unmasked text frames themselves; for a message frame they read only the
C{"offset"} (to count lost and duplicated messages per connection) and the
publisher's send time C{"data":{"t":...}} (time.time_ns(), for the
publish-to-receive latency).  Control frames (welcome, subscribed) are parsed
as JSON; pings are answered.  Publishers speak HTTP/1.1 keep-alive by hand.

Pushie, bench/baseline_server.py and the Node peer (bench/node/server.js)
are driven through the same URLs: C{GET /websocket?channel=X} and C{POST
/publish}.  Nchan speaks otherwise, and the commands take a C{raw=True} for
it: subscribers open C{/sub/X} and count as subscribed at the 101 (Nchan sends
no frame of its own), each text frame is the message body itself (the data,
no envelope, no offset: a connection's messages are counted, and more than
were published to its channel count as duplicates), and publishers C{POST
/pub/X} with the data as the body (no batches: Nchan has none), counting the
messages each channel was sent from the 201/202 answers.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import resource
import select
import socket
import struct
import time
import traceback
from array import array
from collections import Counter, deque
from typing import Any

HOST = "127.0.0.1"
READ_SIZE = 65536  # not more: os.read() allocates this much each time, and 256 KiB reads cost ~5x the system time
NICE = 10  # the server gets its core first: 2 cores, 1 server process and 5 load generators
_LINGER_RST = struct.pack("ii", 1, 0)
_MESSAGE_PREFIX = b'{"type":"message"'
_RAW_PREFIX = b'{"t":'  # a raw (Nchan) message: the data itself
PUBLISHED = ("200", "201", "202")  # Nchan answers 201 (delivered to subscribers) or 202 (queued, none listening)
_PAD = b"x" * 68  # {"t":<19 digits>,"p":"<68 x>"} is 100 bytes of data


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def make_data() -> bytes:
    """About 100 bytes of JSON data carrying the send time."""
    return b'{"t":%d,"p":"%s"}' % (time.time_ns(), _PAD)


def handshake_request(path: str) -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


def _rst_close(what: asyncio.BaseTransport | socket.socket) -> None:
    """Close with an RST: no TIME_WAIT left behind, so ports are not used up."""
    sock = what if isinstance(what, socket.socket) else what.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    if isinstance(what, socket.socket):
        what.close()
    elif isinstance(what, asyncio.Transport):
        what.abort()


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    # Clients must mask; a zero mask key leaves the payload as it is.
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


# -- subscribers ---------------------------------------------------------------


class Connection:
    """One subscriber: a WebSocket connection subscribed to one channel (in its URL)."""

    __slots__ = (
        "worker", "sock", "fd", "channel", "buf", "open", "start", "last", "unique", "dups", "began",
    )  # fmt: skip

    def __init__(self, worker: SubscriberWorker, sock: socket.socket, channel: str) -> None:
        self.worker = worker
        self.sock = sock
        self.fd = sock.fileno()
        self.channel = channel
        self.buf = b""
        self.open = False
        self.start: int | None = None  # the channel's offset in the subscribed frame
        self.last = 0
        self.unique = 0
        self.dups = 0
        self.began = time.monotonic()

    def feed(self, data: bytes) -> None:
        """Parse what the server sent: the handshake answer, then frames."""
        if not self.open:
            data = self.buf + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                self.worker.failed(self, "handshake refused: " + data[:40].decode("latin-1").split("\r\n")[0])
                return
            self.open = True
            data = data[end + 4 :]
            self.buf = b""
            if self.worker.raw:  # no subscribed frame: subscribed with the 101
                self.start = self.last = 0
                self.worker.subscribed(self)
        elif self.buf:
            data = self.buf + data
        n = len(data)
        i = 0
        now = 0
        last = self.last
        unique = 0
        dups = 0
        prefix = _MESSAGE_PREFIX
        raw = self.worker.raw
        while n - i >= 2:
            length = data[i + 1] & 0x7F
            if length < 126:
                p = i + 2
            elif length == 126:
                if n - i < 4:
                    break
                length = (data[i + 2] << 8) | data[i + 3]
                p = i + 4
            else:
                if n - i < 10:
                    break
                length = int.from_bytes(data[i + 2 : i + 10], "big")
                p = i + 10
            end = p + length
            if end > n:
                break
            opcode = data[i] & 0x0F
            if raw and opcode == 1 and data.startswith(_RAW_PREFIX, p):
                unique += 1  # no offsets: counted, and checked against what was published in _counts
                if not now:
                    now = time.time_ns()
                self.worker.latency(now - int(data[p + 5 : data.find(b",", p, end)]))
            elif opcode == 1 and data.startswith(prefix, p):
                j = data.find(b'"offset":', p, end) + 9
                k = data.find(b",", j, end)
                offset = int(data[j:k])
                if offset > last:
                    last = offset
                    unique += 1
                else:
                    dups += 1
                j = data.find(b'"data":{"t":', k, end)
                if j >= 0:
                    if not now:
                        now = time.time_ns()
                    j += 12
                    self.worker.latency(now - int(data[j : data.find(b",", j, end)]))
            elif opcode == 1:
                self._control(data[p:end])
            elif opcode == 9:
                self.sock.send(_masked_frame(0xA, data[p:end]))
            elif opcode == 8:
                code = int.from_bytes(data[p : p + 2], "big") if length >= 2 else 1005
                self.worker.close_codes[code] += 1
                self.worker.failed(self, f"closed by the server with {code}")
                return
            i = end
        self.buf = data[i:] if i < n else b""
        if unique or dups:
            self.last = last
            self.unique += unique
            self.dups += dups
            worker = self.worker
            worker.received += unique
            worker.last_receive = now or time.time_ns()
            if not worker.first_receive:
                worker.first_receive = worker.last_receive

    def _control(self, payload: bytes) -> None:
        frame = json.loads(payload)
        kind = frame.get("type")
        if kind == "subscribed":
            self.start = self.last = frame["offset"]
            self.worker.subscribed(self)
        elif kind == "error":
            self.worker.errors["frame_error_" + str(frame.get("code"))] += 1


class SubscriberWorker:
    """
    Holds subscriber connections and reads them in a plain epoll loop.

    Measured on a 2-core machine, this costs a fraction of what asyncio's
    transports and protocols cost per delivery (a few microseconds of Python
    per read).  With C{nap} set, the loop sleeps that long after a busy poll
    (C{busy} or more ready sockets), so that each read brings several frames:
    fewer reads and ACKs for the same deliveries.  It changes nothing on the
    server's side, but adds up to C{nap} to the measured latency under full
    load, so it is off where latency is the figure.
    """

    def __init__(self, pipe: Any, index: int = 0, delivered: Any = None, nap: float = 0.0, busy: int = 32) -> None:
        self.pipe = pipe
        self.index = index
        self.delivered = delivered  # shared with the publishers: messages received, one slot per process
        self.received = 0
        self.nap = nap
        self.busy = busy
        self.epoll = select.epoll()
        self.connections: dict[int, Connection] = {}  # open ones, by file descriptor
        self.connecting: dict[int, Connection] = {}
        self.subscribers: list[Connection] = []  # every one that got its subscribed frame, even if gone since
        self.queue: deque[tuple[int, str]] = deque()
        self.concurrency = 10
        self.timeout = 30.0
        self.pending_reply: dict[str, Any] | None = None
        self.failures: Counter[str] = Counter()
        self.latencies = array("q")
        self.latency = self.latencies.append
        self.first_receive = 0
        self.last_receive = 0
        self.errors: Counter[str] = Counter()
        self.close_codes: Counter[int] = Counter()
        self.running = True
        self.raw = False  # Nchan: /sub/X, subscribed at the 101, bare message bodies

    def run(self) -> None:
        control = self.pipe.fileno()
        self.epoll.register(control, select.EPOLLIN)
        connections = self.connections
        read = os.read
        poll = self.epoll.poll
        sleep = time.sleep
        while self.running:
            events = poll(0.05 if self.queue or self.connecting else 0.5)
            for fd, _ in events:
                c = connections.get(fd)
                if c is None:
                    if fd == control:
                        self.command()
                    continue
                try:
                    data = read(fd, READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    c.feed(data)
                else:
                    self.errors["connection_lost"] += 1
                    self.failed(c, "connection lost")
            if self.delivered is not None and self.received != self.delivered[self.index]:
                self.delivered[self.index] = self.received
            if self.queue or self.connecting or self.pending_reply is not None:
                self.pump()
            if self.nap and len(events) >= self.busy:
                sleep(self.nap)

    # -- connecting --

    def pump(self) -> None:
        while self.queue and len(self.connecting) < self.concurrency:
            port, channel = self.queue.popleft()
            try:
                sock = socket.create_connection((HOST, port), timeout=10)
                sock.setblocking(False)
                sock.send(handshake_request(f"/sub/{channel}" if self.raw else f"/websocket?channel={channel}"))
            except OSError as e:
                self.failures[f"{type(e).__name__}: {e}"[:120]] += 1
                continue
            c = Connection(self, sock, channel)
            self.connections[c.fd] = c
            self.connecting[c.fd] = c
            self.epoll.register(c.fd, select.EPOLLIN)
        now = time.monotonic()
        for c in [c for c in self.connecting.values() if now - c.began > self.timeout]:
            self.failed(c, "no subscribed frame in time")
        if self.pending_reply is not None and not self.queue and not self.connecting:
            reply, self.pending_reply = self.pending_reply, None
            reply["ok"] = reply.pop("count") - sum(self.failures.values())
            reply["failed"] = dict(self.failures)
            reply["seconds"] = time.monotonic() - reply["seconds"]
            self.failures.clear()
            self.pipe.send(("ok", reply))

    def subscribed(self, c: Connection) -> None:
        self.connecting.pop(c.fd, None)
        self.subscribers.append(c)

    def failed(self, c: Connection, why: str) -> None:
        if self.connecting.pop(c.fd, None) is not None:
            self.failures[why] += 1
        self.drop(c)

    def drop(self, c: Connection) -> None:
        if self.connections.pop(c.fd, None) is not None:
            self.epoll.unregister(c.fd)
            _rst_close(c.sock)

    # -- commands --

    def command(self) -> None:
        try:
            name, kwargs = self.pipe.recv()
        except EOFError:
            self.running = False
            return
        try:
            result = getattr(self, "cmd_" + name)(**kwargs)
        except Exception:
            self.pipe.send(("error", traceback.format_exc()))
            return
        if result is not None:
            self.pipe.send(("ok", result))

    def cmd_subscribe(
        self, targets: list[tuple[int, str]], concurrency: int = 10, timeout: float = 30.0, raw: bool = False
    ) -> None:
        """Open one connection per (port, channel); answers when each has its subscribed frame or failed."""
        self.raw = raw
        self.concurrency = concurrency
        self.timeout = timeout
        self.queue.extend(targets)
        self.pending_reply = {"count": len(targets), "seconds": time.monotonic()}
        self.pump()

    def _counts(self, finals: dict[str, int]) -> dict[str, Any]:
        expected = unique = dups = 0
        for c in self.subscribers:
            assert c.start is not None
            due = max(0, finals.get(c.channel, c.start) - c.start)
            expected += due
            if self.raw:  # counted, not told apart: more than was published are duplicates
                unique += min(c.unique, due)
                dups += max(0, c.unique - due)
            else:
                unique += c.unique
                dups += c.dups
        return {
            "connections": len(self.connections),
            "subscribers": len(self.subscribers),
            "expected": expected,
            "unique": unique,
            "duplicated": dups,
            "first_receive_ns": self.first_receive,
            "last_receive_ns": self.last_receive,
            "errors": dict(self.errors),
            "close_codes": {str(k): v for k, v in self.close_codes.items()},
        }

    def cmd_progress(self, finals: dict[str, int]) -> dict[str, Any]:
        return self._counts(finals)

    def cmd_finish(self, finals: dict[str, int]) -> dict[str, Any]:
        result = self._counts(finals)
        result["lost"] = max(0, result["expected"] - result["unique"])
        result["latencies_ns"] = self.latencies.tobytes()
        return result

    def cmd_close(self) -> dict[str, Any]:
        for c in list(self.connections.values()):
            self.drop(c)
        self.running = False
        return {}


# -- publishers ----------------------------------------------------------------


class HTTPClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.head = self.head_for(b"/publish")
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.buf = b""

    def head_for(self, path: bytes) -> bytes:
        """The request line and headers of a POST to C{path}, up to the Content-Length's value."""
        host = b"127.0.0.1:%d" % self.port
        headers = b"\r\nContent-Type: application/json\r\nContent-Length: "
        return b"POST " + path + b" HTTP/1.1\r\nHost: " + host + headers

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def post(self, body: bytes, head: bytes | None = None) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None and self.waiter is None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write((head or self.head) + b"%d\r\n\r\n" % len(body) + body)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = buf[:end].lower()
        status = int(buf[9:12])
        body_start = end + 4
        if b"transfer-encoding: chunked" in head:
            chunks = []
            i = body_start
            while True:
                line_end = buf.find(b"\r\n", i)
                if line_end < 0:
                    return
                size = int(buf[i:line_end].split(b";")[0], 16)
                if size == 0:
                    if len(buf) < line_end + 4:
                        return
                    rest = line_end + 4  # no trailers
                    break
                if len(buf) < line_end + 2 + size + 2:
                    return
                chunks.append(buf[line_end + 2 : line_end + 2 + size])
                i = line_end + 2 + size + 2
            body = b"".join(chunks)
        else:
            length = 0
            cl = head.find(b"content-length:")
            if cl >= 0:
                line_end = head.find(b"\r\n", cl)
                length = int(head[cl + 15 : line_end if line_end >= 0 else len(head)])
            if len(buf) < body_start + length:
                return
            body = buf[body_start : body_start + length]
            rest = body_start + length
        self.buf = buf[rest:]
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("publisher connection lost"))


# -- handshakes ----------------------------------------------------------------


class Handshaker(asyncio.Protocol):
    """Opens, waits for the 101 and the subscribed frame, and is done."""

    def __init__(self, path: str, done: asyncio.Future[None], raw: bool = False) -> None:
        self.path = path
        self.done = done
        self.raw = raw  # done at the 101's end (Nchan sends no subscribed frame)
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(handshake_request(self.path))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.done.done():
            return
        if len(self.buf) >= 12 and not self.buf.startswith(b"HTTP/1.1 101"):
            self.done.set_exception(RuntimeError("handshake refused: " + self.buf[:12].decode("latin-1")))
        elif b'"type":"subscribed"' in self.buf or (self.raw and b"\r\n\r\n" in self.buf):
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("connection lost during the handshake"))


# -- the worker ----------------------------------------------------------------


class ClientWorker:
    """Publishers and handshake loops, on asyncio."""

    def __init__(self, conn: Any, index: int = 0, delivered: Any = None, published: Any = None) -> None:
        self.conn = conn
        self.index = index
        self.delivered = delivered  # messages received, per subscriber process (shared memory)
        self.published = published  # messages published, per publisher process (shared memory)
        self.finished: asyncio.Future[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.finished = loop.create_future()
        loop.add_reader(self.conn.fileno(), self._command)
        await self.finished

    def _command(self) -> None:
        try:
            name, kwargs = self.conn.recv()
        except EOFError:
            if self.finished is not None and not self.finished.done():
                self.finished.set_result(None)
            return
        asyncio.get_running_loop().create_task(self._run(name, kwargs))

    async def _run(self, name: str, kwargs: dict[str, Any]) -> None:
        try:
            result = await getattr(self, "cmd_" + name)(**kwargs)
            self.conn.send(("ok", result))
        except Exception:
            self.conn.send(("error", traceback.format_exc()))

    # -- commands --

    async def cmd_publish(
        self,
        port: int,
        channels: list[str],
        duration: float | None = None,
        count: int | None = None,
        concurrency: int = 1,
        rate: float | None = None,
        batch: int = 0,
        window: int | None = None,
        per_message: float = 1.0,
        raw: bool = False,
    ) -> dict[str, Any]:
        """
        Publish over C{concurrency} keep-alive connections, round-robin over
        C{channels}, for C{duration} seconds or C{count} requests; as fast as
        the server answers, or paced at C{rate} requests per second in all.
        C{batch}: publications per request (a JSON array), 0 for single objects.

        With a C{window}, no request is sent while the messages published by
        all publisher processes are more than C{window} ahead of what all
        subscribers received (C{per_message} deliveries each): a maximum rate
        that can be sustained, with a bounded queue, not an overload whose
        backlog grows for as long as the run lasts.
        """
        loop = asyncio.get_running_loop()
        finals: dict[str, int] = {}
        statuses: Counter[str] = Counter()
        rtts = array("q")
        published = 0
        requests = 0
        position = 0
        channel_names = [c.encode() for c in channels]
        heads: list[bytes | None] = [None] * len(channels)
        last_channel = 0  # raw: the channel of the body next_body() made last
        started = time.monotonic()
        deadline = started + duration if duration is not None else None

        def next_body() -> bytes:
            nonlocal position, last_channel
            if raw:
                last_channel = position
                position = (position + 1) % len(channel_names)
                return make_data()
            if batch:
                items = []
                for _ in range(batch):
                    items.append(b'{"channel":"%s","data":%s}' % (channel_names[position], make_data()))
                    position = (position + 1) % len(channel_names)
                return b"[" + b",".join(items) + b"]"
            body = b'{"channel":"%s","data":%s}' % (channel_names[position], make_data())
            position = (position + 1) % len(channel_names)
            return body

        def record(body: bytes) -> int:
            answer = json.loads(body)
            results = answer["results"] if "results" in answer else [answer]
            for r in results:
                if r["offset"] > finals.get(r["channel"], 0):
                    finals[r["channel"]] = r["offset"]
            return len(results)

        async def connect() -> HTTPClient:
            _, client = await loop.create_connection(lambda: HTTPClient(port), HOST, port)
            return client

        def ahead() -> bool:
            if not window or self.delivered is None or self.published is None:
                return False
            return sum(self.published) - sum(self.delivered) / per_message > window

        async def publisher(index: int) -> None:
            nonlocal published, requests
            client = await connect()
            interval = concurrency / rate if rate else 0.0
            next_at = time.monotonic() + (index * interval / concurrency if rate else 0.0)
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if count is not None and requests >= count:
                    break
                if rate:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at += interval
                while ahead() and (deadline is None or time.monotonic() < deadline):
                    await asyncio.sleep(0.001)
                requests += 1
                body = next_body()
                head = None
                channel = last_channel
                if raw:
                    head = heads[channel]
                    if head is None:
                        head = heads[channel] = client.head_for(b"/pub/" + channel_names[channel])
                sent = time.perf_counter_ns()
                try:
                    if client.transport is None:
                        client = await connect()
                    status, answer = await client.post(body, head)
                except ConnectionError:
                    statuses["connection_lost"] += 1
                    client = await connect()
                    continue
                rtts.append(time.perf_counter_ns() - sent)
                statuses[str(status)] += 1
                if raw and status in (201, 202):
                    finals[channels[channel]] = finals.get(channels[channel], 0) + 1
                    published += 1
                    if self.published is not None:
                        self.published[self.index] = published
                elif status == 200:
                    published += record(answer)
                    if self.published is not None:
                        self.published[self.index] = published
            if client.transport is not None:
                client.transport.close()

        t_start = time.time_ns()
        await asyncio.gather(*(publisher(i) for i in range(concurrency)))
        t_end = time.time_ns()
        return {
            "published": published,
            "requests": requests,
            "statuses": dict(statuses),
            "finals": finals,
            "start_ns": t_start,
            "end_ns": t_end,
            "rtts_ns": rtts.tobytes(),
        }

    async def cmd_handshakes(
        self, port: int, channel: str, duration: float, concurrency: int, raw: bool = False
    ) -> dict[str, Any]:
        """
        Open, handshake (101 and the subscribed frame), close with RST, again,
        for C{duration} seconds.  C{raw} (Nchan): C{/sub/<channel>}, done at the
        101, as Nchan sends no frame of its own.
        """
        loop = asyncio.get_running_loop()
        path = f"/sub/{channel}" if raw else f"/websocket?channel={channel}"
        times = array("q")
        failures: Counter[str] = Counter()
        deadline = time.monotonic() + duration

        async def one_loop() -> None:
            while time.monotonic() < deadline:
                done: asyncio.Future[None] = loop.create_future()
                started = time.perf_counter_ns()
                transport = None
                try:
                    transport, _ = await loop.create_connection(
                        functools.partial(Handshaker, path, done, raw), HOST, port
                    )
                    await asyncio.wait_for(done, 10)
                    times.append(time.perf_counter_ns() - started)
                except Exception as e:  # noqa: BLE001
                    failures[f"{type(e).__name__}: {e}"[:120]] += 1
                    await asyncio.sleep(0.01)
                finally:
                    if transport is not None:
                        _rst_close(transport)

        t_start = time.time_ns()
        await asyncio.gather(*(one_loop() for _ in range(concurrency)))
        return {
            "ok": len(times),
            "failed": dict(failures),
            "start_ns": t_start,
            "end_ns": time.time_ns(),
            "times_ns": times.tobytes(),
        }

    async def cmd_close(self) -> dict[str, Any]:
        finished = self.finished
        assert finished is not None
        asyncio.get_running_loop().call_soon(finished.set_result, None)
        return {}


def worker_main(conn: Any, kind: str, index: int, options: dict[str, Any]) -> None:
    """Entry point of a worker process: C{subscriber} or C{client}, the C{index}-th of its kind."""
    raise_nofile()
    os.nice(NICE)
    if kind == "subscriber":
        SubscriberWorker(conn, index, **options).run()
    else:
        asyncio.run(ClientWorker(conn, index, **options).run())

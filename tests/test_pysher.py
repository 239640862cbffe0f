"""
Older Pusher clients: Pysher (PyPI, protocol 6, unmodified, in its own
threads as its users run it) against a real daemon, and protocol 5 frame by
frame with an Autobahn client.  What differs from protocol 7 is listed in
pushie.doors.pusher.door.PROTOCOL_VERSIONS and in the README.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import pysher
import pytest_twisted
from twisted.internet import threads

from tests.helpers import Daemon, connect_ws, sleep, wait_for
from tests.test_pusher import APPS, KEY, SDK, SECRET, subscribe


class Recorder:
    """What a Pysher client saw, written from its threads, read from the reactor's."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, Any]] = []

    def on(self, name: str):
        def record(data: Any, *args: Any) -> None:
            with self.lock:
                self.seen.append((name, data))

        return record

    def of(self, name: str) -> list[Any]:
        with self.lock:
            return [data for seen, data in self.seen if seen == name]


def pysher_client(daemon: Daemon, recorder: Recorder, key: str = KEY, **options: Any) -> pysher.Pusher:
    client = pysher.Pusher(
        key,
        secure=False,
        custom_host="127.0.0.1",
        port=daemon.port,
        secret=SECRET,
        log_level=logging.WARNING,
        **options,
    )
    for event in ("pusher:connection_established", "pusher:error", "pusher:ping", "pusher:pong"):
        client.connection.bind(event, recorder.on(event))
    return client


@pytest_twisted.ensureDeferred
async def test_pysher_subscribes_receives_and_stays_through_pings(make_daemon):
    # The server pings after 1 s of silence and closes with 4201 when no pong
    # comes within 1 s: Pysher's pongs (data "") must count.
    daemon = await make_daemon(pusher_apps=APPS, pusher_activity_timeout=1.0, pusher_pong_timeout=1.0)
    seen = Recorder()
    client = pysher_client(daemon, seen, user_data={"user_id": "u1", "user_info": {"name": "Ann"}})
    assert "protocol=6" in client.url  # what Pysher speaks
    client.connect()
    try:
        await wait_for(lambda: client.connection.state == "connected", timeout=10)
        socket_id = client.connection.socket_id
        public = await threads.deferToThread(client.subscribe, "news")
        private = await threads.deferToThread(client.subscribe, "private-news")  # signed with the secret
        for channel in (public, private):
            channel.bind("breaking", seen.on(channel.name))
        await wait_for(lambda: daemon.hub.subscriber_count("news") == 1, timeout=10)
        await wait_for(lambda: daemon.hub.subscriber_count("private-news") == 1, timeout=10)
        # Presence, signed by Pysher over its own JSON of user_data.
        await threads.deferToThread(client.subscribe, "presence-room")
        members: list = []

        async def joined() -> bool:
            members[:] = await daemon.hub.members("presence-room")
            return bool(members)

        for _ in range(100):
            if await joined():
                break
            await sleep(0.1)
        assert [(m.id, m.info) for m in members] == [("u1", {"name": "Ann"})]

        sdk = SDK(daemon)
        await sdk("trigger", ["news", "private-news"], "breaking", {"n": 1})
        await wait_for(lambda: seen.of("news") and seen.of("private-news"), timeout=10)
        assert [json.loads(d) for d in seen.of("news") + seen.of("private-news")] == [{"n": 1}, {"n": 1}]
        # Pysher pinged on open ("data": ""): it was answered.
        await wait_for(lambda: seen.of("pusher:pong"), timeout=10)

        # Silent: the server pings, Pysher answers each time, the connection stays.
        await wait_for(lambda: len(seen.of("pusher:ping")) >= 3, timeout=20)
        await sdk("trigger", "private-news", "breaking", {"n": 2})
        await wait_for(lambda: len(seen.of("private-news")) == 2, timeout=10)
        assert json.loads(seen.of("private-news")[-1]) == {"n": 2}
        assert client.connection.socket_id == socket_id
        assert len(seen.of("pusher:connection_established")) == 1  # never reconnected
        assert seen.of("pusher:error") == []
    finally:
        await threads.deferToThread(client.disconnect, 10)
    await wait_for(lambda: not daemon.service.pusher_factory.connections, timeout=10)


@pytest_twisted.ensureDeferred
async def test_pysher_reads_the_code_of_a_refusal(make_daemon):
    daemon = await make_daemon(pusher_apps=APPS)
    seen = Recorder()
    client = pysher_client(daemon, seen, key="nosuchkey")
    client.connect()
    try:
        await wait_for(lambda: seen.of("pusher:error"), timeout=10)
        # Pysher indexes the data as an object: protocol 6 gets one.
        assert seen.of("pusher:error")[0]["code"] == 4001
        await wait_for(lambda: client.connection.state == "disconnected", timeout=10)
    finally:
        await threads.deferToThread(client.disconnect, 10)


@pytest_twisted.ensureDeferred
async def test_protocol_5_frame_by_frame(make_daemon):
    daemon = await make_daemon(pusher_apps=APPS)
    client = await connect_ws(daemon.port, f"/app/{KEY}?protocol=5&client=java-client&version=2.4.4")
    daemon.clients.append(client)
    established = await client.next()
    assert established["event"] == "pusher:connection_established"
    assert isinstance(established["data"], str)  # still a JSON string, as for 7
    assert "socket_id" in json.loads(established["data"])
    client.send({"event": "pusher:ping"})  # the Java SDK's ping has no data
    assert (await client.next())["event"] == "pusher:pong"
    await subscribe(client, "news")  # subscription_succeeded on a public channel: new in 5
    client.send({"event": "pusher:subscribe", "data": {"channel": "private-x", "auth": f"{KEY}:bad"}})
    error = await client.next()
    assert error["event"] == "pusher:error"
    raw = await client.next()
    assert raw["event"] == "pusher:subscription_error"
    # Objects, not JSON strings, for clients before 7.
    assert isinstance(raw["data"], dict) and raw["data"]["status"] == 401
    assert isinstance(error["data"], dict) and "private-x" in error["data"]["message"]

"""
The Pusher apps file while the daemon runs: per-app options (enabled,
max_connections, client_event_rate), reloads on change and on SIGHUP (the
in-process daemon's reload(), which the signal calls; a real SIGHUP to twistd
at the end), and a bad file that keeps the apps as they were.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest_twisted

from tests.helpers import Daemon, connect_ws, wait_for
from tests.test_daemon import spawn, stop
from tests.test_pusher import (
    APP_ID,
    KEY,
    OTHER_ID,
    OTHER_KEY,
    OTHER_SECRET,
    SDK,
    SECRET,
    api,
    connect,
    expect,
    signed_query,
    subscribe,
)

A = f"{APP_ID}:{KEY}:{SECRET}"
B = f"{OTHER_ID}:{OTHER_KEY}:{OTHER_SECRET}"


def rewrite(path: Path, text: str) -> None:
    """Change the file as an editor would, with a later modification time."""
    path.write_text(text)
    later = time.time() + 5
    os.utime(path, (later, later))


async def refused(daemon: Daemon, key: str) -> tuple[int, str]:
    """A new connection's refusal: the code of its pusher:error, which must be its close code."""
    client = await connect_ws(daemon.port, f"/app/{key}?protocol=7")
    daemon.clients.append(client)
    error = await expect(client, "pusher:error")
    code, _ = await client.closed
    assert code == error["data"]["code"]
    return code, error["data"]["message"]


async def closed_with(client, code: int) -> None:
    error = await expect(client, "pusher:error")
    assert error["data"]["code"] == code
    assert (await client.closed)[0] == code


async def other_app_api(daemon: Daemon) -> tuple[int, object]:
    body = {"name": "e", "channel": "news", "data": "1"}
    raw = json.dumps(body).encode()
    query = signed_query("POST", f"/apps/{OTHER_ID}/events", raw, key=OTHER_KEY, secret=OTHER_SECRET)
    return await api(daemon, "POST", f"/apps/{OTHER_ID}/events", body, query=query)


@pytest_twisted.ensureDeferred
async def test_quota_rate_disable_bad_file_and_removal(make_daemon, tmp_path, log_events):
    path = tmp_path / "apps"
    path.write_text(f"# first app: the native channels\n{A}\n{B} max_connections=2 client_event_rate=1\n")
    daemon = await make_daemon(pusher_apps_file=str(path))
    factory = daemon.service.pusher_factory

    a = await connect(daemon)
    b1 = await connect(daemon, key=OTHER_KEY)
    b2 = await connect(daemon, key=OTHER_KEY)
    code, message = await refused(daemon, OTHER_KEY)
    assert code == 4004 and "quota" in message

    # The app's own client event rate (1 a second) beats the daemon's (10).
    auth = SDK(daemon, OTHER_ID, OTHER_KEY, OTHER_SECRET).authenticate("private-chat", b1.socket_id)
    await subscribe(b1, "private-chat", auth=auth["auth"])
    b1.send({"event": "client-typing", "channel": "private-chat", "data": {}})
    b1.send({"event": "client-typing", "channel": "private-chat", "data": {}})
    error = await expect(b1, "pusher:error")
    assert error["data"]["code"] == 4301 and "only 1 accepted" in error["data"]["message"]

    # A change is seen without a signal (one stat a second): a higher quota.
    rewrite(path, f"{A}\n{B} max_connections=3\n")
    await wait_for(lambda: factory.apps.by_id(OTHER_ID).max_connections == 3, timeout=10)
    b3 = await connect(daemon, key=OTHER_KEY)

    # Disabled: its clients are closed with 4003, new ones refused, its API says 403.
    path.write_text(f"{A}\n{B} enabled=false\n")
    daemon.service.reload()  # what SIGHUP calls
    for client in (b1, b2, b3):
        await closed_with(client, 4003)
    assert (await refused(daemon, OTHER_KEY))[0] == 4003
    status, body = await other_app_api(daemon)
    assert status == 403 and body["error"] == "app_disabled", body
    a.send({"event": "pusher:ping", "data": {}})
    await expect(a, "pusher:pong")  # the other app's client is untouched

    # A bad file keeps the apps as they were, and says why.
    rewrite(path, f"{A}\n{B} enabled=nope\n")
    daemon.service.reload()
    assert (await refused(daemon, OTHER_KEY))[0] == 4003
    assert [app.id for app in factory.apps.all] == [APP_ID, OTHER_ID]
    said = [e.get("log_format", "") for e in log_events]
    assert any("Keeping the previous" in text for text in said), said
    a.send({"event": "pusher:ping", "data": {}})
    await expect(a, "pusher:pong")

    # Removed: its clients are closed with 4001 (unknown app, as at connect).
    rewrite(path, f"{B}\n")
    await wait_for(lambda: factory.apps.by_id(APP_ID) is None, timeout=10)
    await closed_with(a, 4001)
    assert (await refused(daemon, KEY))[0] == 4001
    # The other app is enabled again, and now the first: it shares the native channels.
    again = await connect(daemon, key=OTHER_KEY)
    await subscribe(again, "news")
    status, _, _ = await daemon.publish({"channel": "news", "data": 7})
    assert status == 200
    assert (await expect(again, "message"))["data"] == 7


@pytest_twisted.ensureDeferred
async def test_apps_file_may_start_empty_and_gain_apps(make_daemon, tmp_path):
    path = tmp_path / "apps"
    path.write_text("# no apps yet\n")
    daemon = await make_daemon(pusher_apps_file=str(path))
    assert (await refused(daemon, KEY))[0] == 4001
    rewrite(path, f"{A}\n")
    daemon.service.reload()
    client = await connect(daemon)
    await subscribe(client, "news")


@pytest_twisted.ensureDeferred
async def test_sighup_rereads_an_unchanged_looking_file(tmp_path):
    """
    A real twistd and a real SIGHUP.  The file is edited in place to the same
    size and its modification time put back, so that the once-a-second look
    cannot see the change: only the signal can.
    """
    path = tmp_path / "apps"
    path.write_text(f"{A} enabled=true \n")
    stamp = os.stat(path)
    tcp = "tcp:0:interface=127.0.0.1"
    proc = spawn(["-n", "--pidfile=", "pushie", "--listen", tcp, "--pusher-apps-file", str(path)])
    try:
        await wait_for(lambda: proc.addresses or proc.ended.called, timeout=20)
        assert proc.addresses, proc.output.decode()
        port = proc.port_of(tcp)
        client = await connect_ws(port, f"/app/{KEY}?protocol=7")
        assert (await client.next())["event"] == "pusher:connection_established"

        with open(path, "r+") as f:
            f.write(f"{A} enabled=false\n")
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert os.stat(path).st_size == stamp.st_size

        proc.transport.signalProcess("HUP")
        await closed_with(client, 4003)
        assert b"Reloaded Pusher apps" in proc.output
    finally:
        assert await stop(proc) == 0
    assert b"Traceback" not in proc.output


@pytest_twisted.ensureDeferred
async def test_a_new_secret_keeps_connections_and_signs_the_next_subscriptions(make_daemon, tmp_path):
    path = tmp_path / "apps"
    path.write_text(f"{A}\n")
    daemon = await make_daemon(pusher_apps_file=str(path))
    client = await connect(daemon)
    await subscribe(client, "private-a", auth=SDK(daemon).authenticate("private-a", client.socket_id)["auth"])
    new_secret = "a-brand-new-secret-0001"
    path.write_text(f"{APP_ID}:{KEY}:{new_secret}\n")
    daemon.service.reload()
    # Still open and subscribed: an event reaches it.
    await SDK(daemon, secret=new_secret)("trigger", "private-a", "e", "1")
    assert (await expect(client, "e"))["data"] == 1
    # The old secret signs nothing any more; the new one does.
    old = SDK(daemon).authenticate("private-b", client.socket_id)["auth"]
    client.send({"event": "pusher:subscribe", "data": {"channel": "private-b", "auth": old}})
    assert "private-b" in (await expect(client, "pusher:error"))["data"]["message"]
    await expect(client, "pusher:subscription_error")
    new = SDK(daemon, secret=new_secret).authenticate("private-b", client.socket_id)["auth"]
    await subscribe(client, "private-b", auth=new)

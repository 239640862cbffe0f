"""
The layer rule that imports cannot show: a door talks to the Hub, never to
the engine behind it (DESIGN.md, "Layout").  `lint-imports` (pyproject.toml's
[tool.importlinter]) checks what modules import; these tests check what the
doors' code names and what it touches while it runs.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import pytest_twisted

from tests.test_pusher import APPS, api, connect, subscribe

DOORS = Path(__file__).resolve().parent.parent / "pushie" / "doors"


def _reach_through(source: str) -> list[str]:
    """
    What in C{source} names the engine, a private attribute of a Hub, or
    the Hub's clock, metrics or limits (a door gets those from the wiring).
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            borrowed = node.attr.startswith("_") or node.attr in ("reactor", "metrics", "limits")
            if node.attr in ("engine", "_engine") or (owner.endswith("hub") and borrowed):
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "setattr", "hasattr"):
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and name.value in ("engine", "_engine"):
                found.append(f"line {node.lineno}: {node.func.id}(..., {name.value!r})")
    return found


def test_doors_never_name_the_engine():
    """No door's code names C{.engine}, C{._engine}, a Hub's private attributes or its clock and metrics."""
    doors = sorted(DOORS.rglob("*.py"))
    assert len(doors) >= 9
    found = {str(path.relative_to(DOORS)): _reach_through(path.read_text()) for path in doors}
    assert {name: places for name, places in found.items() if places} == {}


def test_the_check_sees_reach_through():
    """The check above is not vacuous: it finds each way of reaching past the Hub."""
    assert len(_reach_through("self.factory.hub.engine.state(c)\nhub._engine\ngetattr(hub, 'engine')\n")) == 3
    assert _reach_through("self.hub._channels.get(name)\n") == ["line 1: ._channels"]
    assert _reach_through("self.factory.hub.reactor.seconds()\n") == ["line 1: .reactor"]
    assert _reach_through("self.hub.state(name)\nself._engine_name = 1\n{'engine': hub.engine_name}\n") == []


PUSHIE = DOORS.parent
WIRING = {"tap.py", "config.py", "cli.py"}


def _untyped_settings(source: str) -> list[str]:
    """The parameters in C{source} named C{settings} that are not annotated, or annotated C{Any} or C{Settings}."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in node.args.args + node.args.kwonlyargs:
                annotation = ast.unparse(arg.annotation) if arg.annotation is not None else None
                if (arg.arg == "settings" and annotation in (None, "Any")) or annotation == "Settings":
                    found.append(f"line {node.lineno}: {node.name}({arg.arg}: {annotation})")
    return found


def test_only_the_wiring_reads_the_whole_settings():
    """
    Below C{pushie.tap} no part takes the whole L{pushie.config.Settings} or
    an C{Any} C{settings}: each gets a typed record of its own.
    """
    modules = sorted(p for p in PUSHIE.rglob("*.py") if str(p.relative_to(PUSHIE)) not in WIRING)
    assert len(modules) >= 25
    found = {str(path.relative_to(PUSHIE)): _untyped_settings(path.read_text()) for path in modules}
    assert {name: places for name, places in found.items() if places} == {}


def test_the_settings_check_sees_untyped_settings():
    """The check above is not vacuous."""
    source = "def a(settings): pass\ndef b(x, settings: Any): pass\ndef c(s: Settings): pass\n"
    assert len(_untyped_settings(source)) == 3
    assert _untyped_settings("def d(settings: SSESettings): pass\n") == []


class _Guarded:
    """The Hub's engine, noting every module other than the Hub that touches it."""

    def __init__(self, engine: Any) -> None:
        self._wrapped = engine
        self.touched_by: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.touched_by.append(sys._getframe(1).f_globals.get("__name__", "?"))
        return getattr(self._wrapped, name)


@pytest_twisted.ensureDeferred
async def test_doors_reach_the_engine_only_through_the_hub(make_daemon):
    """
    With the Hub's engine wrapped in a guard, every door's reads (state,
    history, presence, occupancy, health; native API, WebSocket, Pusher HTTP
    API and WebSocket) go through the Hub's own code.
    """
    daemon = await make_daemon(pusher_apps=APPS)
    hub = daemon.hub
    guard = _Guarded(hub._engine)
    hub._engine = guard
    try:
        status, _, _ = await daemon.publish({"channel": "a", "data": 1})
        assert status == 200
        for path in ("/channels/a", "/channels/a/history?since=0", "/channels/presence-a/presence", "/healthz"):
            status, _, _ = await daemon.get(path)
            assert status == 200, path
        client = await daemon.connect()
        await client.next_of("welcome")
        client.send({"type": "subscribe", "channel": "a"})
        await client.next_of("subscribed")
        status, _ = await api(daemon, "GET", "/apps/3/channels")
        assert status == 200
        status, _ = await api(daemon, "GET", "/apps/3/channels/presence-x/users")
        assert status == 200
        pusher = await connect(daemon)
        await subscribe(pusher, "b")
        pusher.close()
        await pusher.closed
    finally:
        hub._engine = guard._wrapped
    assert guard.touched_by, "the guard saw nothing: the test no longer exercises the engine"
    assert sorted(set(guard.touched_by)) == ["pushie.hub"]


def test_one_envelope_builder_and_no_pusher_fields_on_the_shared_records():
    """
    The envelope's fields are written in pushie.wire only (the Redis publish
    script fills in its offset and epoch), and the records the Hub moves carry
    nothing of the Pusher door: its frames are its own (issue 13 item 4).
    """
    import attr

    from pushie.engines.redis import PUBLISH_SCRIPT
    from pushie.records import Burst, Publication, PublishRequest

    for field in ('"type"', '"channel"', '"event"', '"offset"', '"epoch"', '"data"', '"user_id"'):
        assert field not in PUBLISH_SCRIPT, field
    for record in (Publication, PublishRequest):
        names = {f.name for f in attr.fields(record)}
        assert not {n for n in names if "pusher" in n or n == "exclude"}, names
    assert not [s for s in Burst.__slots__ if "pusher" in s]

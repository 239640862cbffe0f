"""
The OpenAPI 3.1 description of the HTTP API (C{pushie/static/openapi.json},
served at C{/openapi.json}) is kept true three ways:

  - it validates as OpenAPI 3.1 (C{openapi-spec-validator});
  - the routes a live daemon serves and the documented ones are the same
    set, and every documented operation answers a documented status (never
    a 404) on a live daemon;
  - every error code it names has, in docs/PROTOCOL.md §14, the status it
    is documented under, and every HTTP code of §14 that the documented
    paths can answer is in it;

and C{schemathesis} generates requests from it against a live daemon: no
answer may be a 5xx, and every answer must conform to the description. The
signed Pusher HTTP API gets a run of its own, with every request signed by
the hooks in C{tests/schemathesis_hooks.py}, so that it reaches the handlers.

The validator and schemathesis come with the test extra; without them these
tests skip, or fail when C{PUSHIE_REQUIRE_SCHEMATHESIS=1} (as in CI).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import threads

import pushie
from tests.helpers import Daemon

ROOT = Path(__file__).resolve().parent.parent
SPEC_FILE = ROOT / "pushie" / "static" / "openapi.json"
PROTOCOL = ROOT / "docs" / "PROTOCOL.md"
KEY = "openapi-test-publisher-key-0123456789"
APP_ID, APP_KEY, APP_SECRET = "7", "openapikey0001", "openapisecret0001"


def spec() -> dict[str, Any]:
    return json.loads(SPEC_FILE.read_text(encoding="utf-8"))


def need(module: str) -> Any:
    """Import a test-extra module; skip without it, or fail when CI asks for it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        reason = f"{module} is not installed (pip install '.[test]')"
        if os.environ.get("PUSHIE_REQUIRE_SCHEMATHESIS") == "1":
            pytest.fail(reason + " and PUSHIE_REQUIRE_SCHEMATHESIS=1 is set")
        pytest.skip(reason)


@pytest.fixture
def engine():
    """The memory engine only: these tests check the HTTP surface, not the engines."""
    return "memory"


async def start(make_daemon, **settings) -> Daemon:
    settings.setdefault("publisher_keys", [KEY])
    settings.setdefault("pusher_apps", [f"{APP_ID}:{APP_KEY}:{APP_SECRET}"])
    return await make_daemon(**settings)


def operations(description: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in description["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "delete", "patch", "head", "options")
    ]


def error_codes(description: dict[str, Any]) -> set[tuple[str, int]]:
    """Every (code, status) the description names in an error answer's C{error} enum."""
    found = set()
    for _path, _method, op in operations(description):
        for status, answer in op["responses"].items():
            for media in answer.get("content", {}).values():
                for part in media["schema"].get("allOf", []):
                    for code in part.get("properties", {}).get("error", {}).get("enum", []):
                        found.add((code, int(status)))
    return found


def protocol_index() -> dict[str, tuple[str, str]]:
    """docs/PROTOCOL.md §14: code -> (status, where)."""
    text = PROTOCOL.read_text(encoding="utf-8")
    section = text[text.index("## 14. Index of error codes") :]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \| ([^|]+) \|$", section, re.MULTILINE)
    return {code: (status.strip(), where.strip()) for code, status, where in rows}


def test_the_description_is_valid_openapi_3_1():
    validator = need("openapi_spec_validator")
    description = spec()
    assert description["openapi"].startswith("3.1.")
    assert description["info"]["version"] == pushie.__version__
    validator.validate(description)


def test_every_error_code_is_the_protocols():
    """Each code the description names is in PROTOCOL.md §14 with that status."""
    index = protocol_index()
    assert len(index) > 30, "the §14 table was not found"
    for code, status in sorted(error_codes(spec())):
        assert code in index, f"openapi.json names {code!r}, which PROTOCOL.md §14 does not list"
        assert index[code][0] == str(status), f"{code!r}: openapi.json says {status}, PROTOCOL.md §14 {index[code][0]}"


def test_every_http_code_of_the_protocol_is_described():
    """
    The converse: a code §14 gives an HTTP status and places on a described
    door (/publish, SSE, the server API, Pusher, any request) is in the description.
    """
    named = {code for code, _status in error_codes(spec())}
    doors = ("/publish", "SSE", "API", "Pusher", "any HTTP request", "any unknown path", "at accept", "every JSON path")
    missing = [
        code
        for code, (status, where) in protocol_index().items()
        if status.isdigit()
        and any(door in where.replace("the Pusher WebSocket", "") for door in doors)
        and code not in named
    ]
    # 405 answers a method an operation does not have: OpenAPI describes
    # operations, so the description says it in words (info.description).
    assert "405 method_not_allowed" in spec()["info"]["description"]
    missing.remove("method_not_allowed")
    assert not missing, f"PROTOCOL.md §14 codes missing from openapi.json: {missing}"


@pytest_twisted.ensureDeferred
async def test_every_served_route_is_described(make_daemon):
    """The first path segments the daemon serves are exactly those the description documents."""
    daemon = await start(make_daemon)
    site = daemon.service.ports()[0].factory
    served = {"/" + name.decode() for name in site.resource.children} | {"/"}
    described = {"/" + path.split("/")[1] for path in spec()["paths"]}
    assert served == described


@pytest_twisted.ensureDeferred
async def test_the_daemon_serves_its_description_without_a_key(make_daemon):
    daemon = await start(make_daemon)
    response = await treq.get(daemon.url + "/openapi.json", pool=daemon.pool)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert json.loads(await response.content()) == spec()


def _example_path(path: str) -> str:
    values = {"name": "news", "channel_name": "presence-room", "app_id": APP_ID, "user_id": "u1", "key": APP_KEY}
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


@pytest_twisted.ensureDeferred
async def test_every_described_operation_answers_a_described_status(make_daemon):
    """
    Each documented operation, asked plainly (no key, no signature, no
    query), answers one of its documented statuses, and none answers 404.
    """
    daemon = await start(make_daemon)
    answers = {}
    for path, method, op in operations(spec()):
        headers = {"Authorization": f"Bearer {KEY}"} if path == "/channels/{name}/presence" else {}
        response = await treq.request(
            method.upper(), daemon.url + _example_path(path), headers=headers, pool=daemon.pool
        )
        await response.content()
        answers[f"{method.upper()} {path}"] = response.code
        assert response.code != 404, f"{method.upper()} {path} answered 404"
        assert str(response.code) in op["responses"], f"{method.upper()} {path} answered {response.code}"
    # What the plain requests are refused with says the guards are on.
    assert answers["POST /publish"] == 401
    assert answers["GET /channels"] == 401
    assert answers["GET /channels/{name}/presence"] == 400  # news is not a presence- channel
    assert answers["GET /events"] == 400  # no channel
    assert answers["GET /websocket"] == 426
    assert answers["POST /apps/{app_id}/events"] == 401
    assert answers["GET /healthz"] == answers["GET /openapi.json"] == 200
    # The dashboard is off without an admin_token: every path says so (test_admin.py covers it on).
    assert {answers[op] for op in answers if " /admin" in op} == {403}


# -- schemathesis --------------------------------------------------------

PUSHER_API_PATHS = "^/(apps|users)/"
"""The signed Pusher HTTP API (tests/schemathesis_hooks.py signs its requests)."""

SCHEMATHESIS_EXCLUDED = [
    # An endless text/event-stream: a generated request would wait for its end.
    "/events",
    # The WebSocket doors: handshakes, not an HTTP API (PROTOCOL.md §5, §13).
    "/websocket",
    "/app/{key}",
    # The admin dashboard's live stream: endless as /events.
    "/admin/stream",
]


def run_schemathesis(
    url: str, report: Path, paths: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The schemathesis CLI against C{url}, in a thread while the reactor serves the daemon."""
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        url + "/openapi.json",
        "--url",
        url,
        "--header",
        f"Authorization: Bearer {KEY}",
        "--checks",
        "all",
        "--max-examples",
        "25",
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--max-time",
        "50",
        "--phases",
        "examples,coverage,fuzzing",
        "--suppress-health-check",
        "all",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
        *paths,
        *[arg for path in SCHEMATHESIS_EXCLUDED for arg in ("--exclude-path", path)],
    ]
    environ = {**os.environ, "NO_COLOR": "1", **(env or {})}
    # Run in the report's folder: the CLI leaves a .schemathesis/ folder in its working directory.
    return subprocess.run(
        command, capture_output=True, text=True, env=environ, cwd=report.parent, timeout=180, check=False
    )


@pytest_twisted.ensureDeferred
async def test_schemathesis_finds_nothing(make_daemon):
    """
    Requests generated from the description (valid and invalid ones) against
    a live daemon: no 5xx, and every answer conforms to the description.
    """
    need("schemathesis")
    need("openapi_spec_validator")
    # The dashboard on, with the publisher key as its token: the one header opens both.
    daemon = await start(make_daemon, publish_rate=0, admin_token=KEY)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        result = await threads.deferToThread(
            run_schemathesis, daemon.url, report, ["--exclude-path-regex", PUSHER_API_PATHS]
        )
    output = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, output
    assert re.search(r"\b[1-9]\d* passed\b", output), output
    print(output[output.find("SUMMARY") :])  # the figures, with pytest -s


@pytest_twisted.ensureDeferred
async def test_schemathesis_on_the_signed_pusher_api(make_daemon):
    """
    The Pusher HTTP API with every generated request signed with the test
    app's secret (tests/schemathesis_hooks.py), so that they reach the real
    handlers: no 5xx, every answer conforms to the description, unsigned
    probes get their 401, and every operation answered 200 at least once.
    """
    need("schemathesis")
    need("openapi_spec_validator")
    daemon = await start(make_daemon, publish_rate=0)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        statuses = Path(tmp) / "statuses"
        env = {
            "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PUSHIE_TEST_PUSHER_APP": f"{APP_ID}:{APP_KEY}:{APP_SECRET}",
            "PUSHIE_TEST_STATUSES": str(statuses),
        }
        result = await threads.deferToThread(
            run_schemathesis, daemon.url, report, ["--include-path-regex", PUSHER_API_PATHS], env
        )
        answered = statuses.read_text(encoding="utf-8").splitlines() if statuses.exists() else []
    output = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, output
    assert re.search(r"\b[1-9]\d* passed\b", output), output
    pusher_operations = {f"{m.upper()} {p}" for p, m, _ in operations(spec()) if re.match(PUSHER_API_PATHS, p)}
    # after_call's lines: METHOD PATH STATUS 'the start of the body'. Every
    # operation got past the signature to its handler (a 200, or a refusal
    # of what the handler checks), and the triggers' examples were published.
    statuses = [line.split(" ", 3) for line in answered]
    handled = {
        f"{method} {path}"
        for method, path, status, body in statuses
        if status == "200" or (status in ("400", "413") and "invalid_query" not in body)
    }
    assert handled == pusher_operations, (sorted(pusher_operations - handled), answered[-50:])
    ok = {f"{method} {path}" for method, path, status, _ in statuses if status == "200"}
    assert {f"POST /apps/{{app_id}}/{name}" for name in ("events", "batch_events")} <= ok, answered[-50:]
    print(output[output.find("SUMMARY") :])
    print(Counter(status for _, _, status, _ in statuses))  # the figures, with pytest -s


@pytest_twisted.ensureDeferred
async def test_an_unknown_method_on_a_static_path_is_a_json_405(make_daemon):
    """
    Found by schemathesis: TRACE on /, /pushie.js, /openapi.json and
    /metrics got Twisted's HTML 501; every path answers the JSON 405.
    """
    daemon = await start(make_daemon)
    for path in ("/", "/pushie.js", "/openapi.json", "/metrics"):
        response = await treq.request("TRACE", daemon.url + path, pool=daemon.pool)
        body = json.loads(await response.content())
        assert (response.code, body["error"]) == (405, "method_not_allowed"), path
        assert response.headers.getRawHeaders(b"allow") == [b"GET"], path

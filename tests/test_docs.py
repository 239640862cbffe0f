"""
docs/PROTOCOL.md is the public contract: these tests keep it from silently
falling behind the code.  Every error code and close code that the code in
C{pushie/} can send must be named there, and every section that code, tests or
the README cite as C{docs/PROTOCOL.md §N} must exist.  (They read the source
as text: a code built some other way than the patterns below must be added
to them, which a reviewer will see.)
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "PROTOCOL.md"
CHANGELOG = ROOT / "CHANGELOG.md"

# How pushie/ spells a code a client receives: PushieError(status, "code", ...)
# (and the subclasses' super().__init__(status, "code", ...)), bad_request("code", ...),
# and frames or events built by hand, {"type": "error", "code": "..."}.
_ERROR_CODE_PATTERNS = (
    re.compile(r'\(\s*\d{3},\s*"([a-z_]+)"'),
    re.compile(r'\bbad_request\(\s*"([a-z_]+)"'),
    re.compile(r'"code":\s*"([a-z_]+)"'),
)
# How pushie/ spells a WebSocket close code it sends.
_CLOSE_CODE_PATTERNS = (
    re.compile(r"^\s*CLOSE_[A-Z_]+\s*=\s*(\d{4})\b", re.MULTILINE),
    re.compile(r"\bclose_with\(\s*(\d{4})\b"),
    re.compile(r"\bslow_close_code\s*=\s*(\d{4})\b"),
    re.compile(r"\bQUIET_CLOSE_CODES\s*=\s*frozenset\(\{([\d,\s]+)\}\)"),
)
# Sent for the doors by Autobahn, as configured in pushie.doors._wsbase (failByDrop
# off, so protocol errors get a close frame): the reply to a client's close,
# protocol errors, invalid UTF-8, oversize frames.
AUTOBAHN_CLOSE_CODES = {1000, 1002, 1007, 1009}

_CITATION = re.compile(r"docs/PROTOCOL\.md §(\d+(?:\.\d+)?)")


# The Python client and the command line are clients of the protocol: their
# own error codes (unreachable, timeout, invalid_response) never go on the wire.
_CLIENT_SIDE = {"pushie/client.py", "pushie/cli.py"}


def _sources() -> list[Path]:
    """The daemon's modules."""
    return sorted(p for p in (ROOT / "pushie").rglob("*.py") if str(p.relative_to(ROOT)) not in _CLIENT_SIDE)


def error_codes_in_code() -> dict[str, set[str]]:
    """Every error code the product code can send, with the modules that send it."""
    codes: dict[str, set[str]] = {}
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for pattern in _ERROR_CODE_PATTERNS:
            for code in pattern.findall(text):
                codes.setdefault(code, set()).add(str(path.relative_to(ROOT)))
    return codes


def close_codes_in_code() -> set[int]:
    """Every WebSocket close code the product code sends itself."""
    codes: set[int] = set()
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for pattern in _CLOSE_CODE_PATTERNS:
            for found in pattern.findall(text):
                codes.update(int(n) for n in re.findall(r"\d{4}", found))
    return codes


def protocol_text() -> str:
    return PROTOCOL.read_text(encoding="utf-8")


def test_the_contract_and_the_changelog_exist():
    text = protocol_text()
    assert text.startswith("# The Pushie protocol")
    changelog = CHANGELOG.read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and "## [0.1.0]" in changelog
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/PROTOCOL.md)" in readme and "(CHANGELOG.md)" in readme


def test_the_code_scan_finds_what_it_should():
    # If the patterns stopped matching, the tests below would pass vacuously.
    codes = error_codes_in_code()
    assert len(codes) >= 35
    for code in ("invalid_json", "outcome_unknown", "engine_unavailable", "presence_full", "identity_changed",
                 "token_expired", "request_timeout", "too_many_connections", "forbidden"):  # fmt: skip
        assert code in codes, code
    assert {1001, 1003, 1013, 4001, 4002, 4100, 4200, 4201} <= close_codes_in_code()


def test_every_error_code_is_documented():
    text = protocol_text()
    missing = {code: sorted(where) for code, where in error_codes_in_code().items() if f"`{code}`" not in text}
    assert not missing, f"error codes sent by pushie/ but not named in docs/PROTOCOL.md: {missing}"


def test_every_error_code_is_in_the_index():
    index = protocol_text().split("## 14. Index of error codes", 1)[1]
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", index, re.MULTILINE))
    missing = set(error_codes_in_code()) - rows
    assert not missing, f"error codes missing from docs/PROTOCOL.md §14: {sorted(missing)}"


def test_every_close_code_is_documented():
    # A close code is documented by a table row of its own: | `4002` | ...
    rows = {int(n) for n in re.findall(r"^\| `(\d{4})` \|", protocol_text(), re.MULTILINE)}
    missing = (close_codes_in_code() | AUTOBAHN_CLOSE_CODES) - rows
    assert not missing, f"close codes sent but not in a table of docs/PROTOCOL.md: {sorted(missing)}"


def test_cited_sections_exist():
    text = protocol_text()
    headings = set(re.findall(r"^## (\d+)\. ", text, re.MULTILINE))
    headings |= set(re.findall(r"^### (\d+\.\d+) ", text, re.MULTILINE))
    cited: dict[str, set[str]] = {}
    for path in [*_sources(), *sorted((ROOT / "tests").glob("*.py")), ROOT / "README.md", CHANGELOG, PROTOCOL]:
        for section in _CITATION.findall(path.read_text(encoding="utf-8")):
            cited.setdefault(section, set()).add(str(path.relative_to(ROOT)))
    assert cited, "nothing cites docs/PROTOCOL.md"
    unknown = {section: sorted(where) for section, where in cited.items() if section not in headings}
    assert not unknown, f"citations of sections docs/PROTOCOL.md does not have: {unknown}"


def test_internal_section_references_exist():
    text = protocol_text()
    headings = set(re.findall(r"^## (\d+)\. ", text, re.MULTILINE))
    headings |= set(re.findall(r"^### (\d+\.\d+) ", text, re.MULTILINE))
    referenced = set(re.findall(r"§(\d+(?:\.\d+)?)", text))
    # "§8.1-§8.4" and the like: every end of a range is a section too.
    unknown = sorted(referenced - headings, key=lambda s: [int(p) for p in s.split(".")])
    assert not unknown, f"docs/PROTOCOL.md refers to sections it does not have: {unknown}"


# -- The README as a newcomer types it (issue 17) ------------------------------

README = ROOT / "README.md"


def _readme_section(title: str) -> str:
    """The text of the README section whose heading is C{title}, up to the next heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(title + "\n")
    end = re.compile(r"^#{1,3} ", re.MULTILINE).search(text, start + len(title))
    return text[start : end.start() if end else len(text)]


def _shell_blocks() -> list[str]:
    """Every ```sh block of the README."""
    return re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_the_quick_start_puts_the_venv_on_the_path():
    """
    The walk-through types C{twistd} and C{pushie}: the quick start must have
    activated the venv they are installed in, or they are not on the PATH.
    """
    first = _shell_blocks()[0].strip()
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install . && twistd "), first
    after = _readme_section("## Quick start").split("```")[2]  # the paragraph after the first command
    assert ". .venv/bin/activate" in after and "every" in after


def test_every_twistd_example_keeps_twistd_pid_out_of_the_folder():
    """A second daemon started from the same folder must not stop on a stale twistd.pid."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    commands = [line for block in blocks for line in block.splitlines() if re.search(r"\btwistd -", line)]
    commands += [span for span in re.findall(r"`([^`]+)`", prose) if re.search(r"\btwistd (-n|--nodaemon)\b", span)]
    assert len(commands) > 5, commands
    for command in commands:
        assert "--pidfile=" in command, command
    assert "twistd.pid" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()


def test_no_example_listens_on_every_interface_with_publishing_open():
    """An example that listens beyond 127.0.0.1 configures publisher keys in the same block."""
    text = README.read_text(encoding="utf-8")
    for block in re.findall(r"```(?:sh|toml)\n(.*?)```", text, re.DOTALL):
        for endpoint in re.findall(r"\b(?:tcp6?|ssl):[^\s\"',]*", block):
            if "interface=127.0.0.1" in endpoint or "interface=::1" in endpoint:
                continue
            assert "PUBLISHER_KEYS" in block.upper(), f"{endpoint} with publishing open in:\n{block}"


def test_the_pusher_examples_use_numeric_app_ids_that_start_a_daemon():
    """The Python pusher SDK takes only numeric app ids; the example must also pass the daemon's own checks."""
    from pushie.doors.pusher.apps import parse_apps

    text = README.read_text(encoding="utf-8") + protocol_text()
    examples = re.findall(r'PUSHIE_PUSHER_APPS="([^"]+)"', text)
    assert examples
    for example in examples:
        for app in parse_apps(example.split(","), "README"):
            assert app.id.isdigit(), example


def _codes(table_text: str) -> set[tuple[str, str]]:
    """(status, code) pairs of a Markdown table whose rows start with statuses and name codes in backticks."""
    pairs = set()
    for line in table_text.splitlines():
        row = re.match(r"\| (\d{3}) \| (.*?) \|", line)
        if row:
            for code in re.findall(r"`([a-z_]+)`", row.group(2)):
                pairs.add((row.group(1), code))
    return pairs


def test_the_readme_publish_errors_are_one_table_that_matches_the_protocol():
    """
    README "Publishing" lists every answer of docs/PROTOCOL.md §3.5 (and the
    site-wide refusals of §1.3), in one table: no row stranded after a paragraph.
    """
    section = _readme_section("### Errors")
    rows = [i for i, line in enumerate(section.splitlines()) if line.startswith("|")]
    assert rows == list(range(rows[0], rows[-1] + 1)), "a table row outside the table"
    readme = _codes(section)
    protocol = protocol_text()
    start = protocol.index("### 3.5 Errors")
    expected = _codes(protocol[start : protocol.index("### 3.6", start)])
    expected |= {("400", "bad_request"), ("408", "request_timeout")}
    expected |= {("503", "too_many_connections"), ("429", "too_many_connections_from_address")}
    assert expected - readme == set()
    assert "to come" not in _readme_section("## Security and limits")


def test_pytest_says_why_a_test_was_skipped():
    """
    A newcomer without chromium sees the browser tests skipped: pytest must
    print why (C{-rs} in addopts), and every skip must give a reason.
    """
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "-rs" in config["tool"]["pytest"]["ini_options"]["addopts"].split()
    for path in sorted((ROOT / "tests").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"pytest\.skip\(\s*\)", text), path
        for mark in re.findall(r"pytest\.mark\.skip(?:if)?\((.*)", text):
            assert "reason=" in mark, (path, mark)

"""
The README's Quick start and walk-through, typed as a newcomer types them
(issue 17): the commands are read from README.md itself and run with bash, as
written, in a fresh copy of the checkout (what a clone would hold, plus the
working tree's changes) with a fresh venv. Change a command in the README and
this test runs the new one; break one and this test fails.

What runs:

  - the Quick start's first command (venv, C{pip install .}, C{twistd ...
    pushie}), fully: it must end in a daemon that serves, logs where it
    listens, its engine, and the open-publishing warning (walk-through step 1);
  - walk-through step 1's command, in a new shell (with C{. .venv/bin/activate}
    first, as the Quick start says) from the same folder while the first daemon
    runs: a second daemon must start, and no C{twistd.pid} may appear;
  - step 3's curl (its answer must be the one the README shows), step 4's
    C{curl -N} event stream, and the C{pushie publish} line, whose message the
    stream must show; then SIGTERM, and the stream must end cleanly;
  - the Quick start's second command (venv, C{pip install '.[test]'}, C{npm
    ci}, pytest) is not run: it would run this suite from inside itself, and
    installing the test extra twice more would double the test's time. It is
    checked instead: bash parses it, it is the Development section's command,
    and .ci/run runs each of its steps (with CI's extra flags), so CI runs it.

A walk-through command this file does not know fails the test: teach it what
the new command should show.

Ports: the README's commands name the default, C{localhost:8080}. The
daemons get a free port instead through C{PUSHIE_LISTEN}, the CLI through
C{PUSHIE_URL} (both documented in the README), and curl through a C{.curlrc}
(C{CURL_HOME}) whose C{connect-to} sends C{localhost:8080} there: the commands
stay as typed, and a busy 8080 on a shared machine cannot fail the test. That
the default really is 8080 is checked against C{pushie.config}.

pip installs from PyPI (reachable on the developers' machines and in CI, as
for C{.ci/run} itself): about 30 s on an idle machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pushie.config import SETTINGS_BY_NAME

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEFAULT_URL = "http://localhost:8080"
WALK_THROUGH = "## Walk-through: a page, a daemon, a curl"

# How long a step may take on a loaded 2-core machine (they are deadlines, not
# measurements: a step that ends sooner goes on at once).
INSTALL_DEADLINE = 400
START_DEADLINE = 60


# -- reading the README ----------------------------------------------------


def section(title: str) -> str:
    """The README section headed C{title}, up to the next heading of any level."""
    text = README.read_text(encoding="utf-8")
    start = text.index(title + "\n")
    end = re.compile(r"^#{1,6} ", re.MULTILINE).search(text, start + len(title))
    return text[start : end.start() if end else len(text)]


def shell_blocks(text: str) -> list[str]:
    """The ```sh blocks of C{text}, dedented (a block inside a list item is indented)."""
    blocks = []
    for indent, body in re.findall(r"^( *)```sh\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL):
        lines = [line[len(indent) :] if line.startswith(indent) else line for line in body.splitlines()]
        blocks.append("\n".join(lines).strip())
    return blocks


def typed_commands(text: str) -> list[str]:
    """
    What a newcomer types from C{text}, in order: each ```sh block, and each
    inline code span of the prose that runs C{twistd}, C{pushie} or C{curl}.
    """
    found: list[tuple[int, str]] = []
    for match in re.finditer(r"^ *```sh\n.*?^ *```", text, re.MULTILINE | re.DOTALL):
        (block,) = shell_blocks(match.group(0))
        found.append((match.start(), block))
    prose = re.sub(r"```.*?```", lambda m: " " * len(m.group(0)), text, flags=re.DOTALL)
    for match in re.finditer(r"`([^`\n]+)`", prose):
        if re.match(r"(twistd|pushie|curl) ", match.group(1)):
            found.append((match.start(), match.group(1)))
    return [command for _, command in sorted(found)]


def quick_start() -> tuple[str, str]:
    """The Quick start's two commands: install and start the daemon; install and run the tests."""
    blocks = shell_blocks(section("## Quick start"))
    assert len(blocks) == 2, f"the Quick start should have two commands, not {blocks}"
    return blocks[0], blocks[1]


# -- running commands as typed ---------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_checkout(target: Path) -> Path:
    """
    What a clone holds, with the working tree's changes: git's tracked and
    untracked files, none that .gitignore names (no .venv, node_modules,
    build/, twistd.pid...). Without git, the tree less the usual ignored folders.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:
        ignore = shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "reports", "node_modules", "*.egg-info", "__pycache__", "twistd.pid"
        )
        shutil.copytree(ROOT, target, ignore=ignore)
        return target
    for name in listed.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():  # a tracked file deleted in the working tree is not copied
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def newcomer_environment(tmp: Path, port: int) -> dict[str, str]:
    """
    A shell's environment without this test run's venv and Pushie settings,
    pointed at the daemon's port (see the module docstring).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith(("PUSHIE_", "PYTEST_"))
    }
    if sys.prefix != sys.base_prefix:  # the tests run from a venv: a newcomer's shell has not activated it
        ours = str(Path(sys.prefix) / "bin")
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != ours)
    curl_home = tmp / f"curl-{port}"
    curl_home.mkdir()
    (curl_home / ".curlrc").write_text(
        f'connect-to = "localhost:8080:127.0.0.1:{port}"\nconnect-to = "127.0.0.1:8080:127.0.0.1:{port}"\n'
    )
    env.update(
        PUSHIE_LISTEN=f"tcp:{port}:interface=127.0.0.1",
        PUSHIE_URL=f"http://127.0.0.1:{port}",
        CURL_HOME=str(curl_home),
        NO_COLOR="1",
    )
    return env


class Shell:
    """One command in a bash of its own (its own session, so that SIGTERM reaches the daemon it runs)."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], log: Path, stderr: bool = True) -> None:
        self.command = command
        self.log = log
        self.stdout = log.open("wb")
        self.process = subprocess.Popen(
            ["bash", "-c", command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.stdout,
            stderr=subprocess.STDOUT if stderr else subprocess.DEVNULL,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, found: Callable[[str], bool], what: str, deadline: float) -> str:
        """Wait until C{found(output)}; fail if the command ends first or C{deadline} seconds pass."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            output = self.output()
            if found(output):
                return output
            if self.process.poll() is not None:
                pytest.fail(f"{self.command!r} ended ({self.process.returncode}) before {what}:\n{output[-6000:]}")
            time.sleep(0.2)
        pytest.fail(f"{self.command!r}: no {what} in {deadline} s:\n{self.output()[-6000:]}")

    def session_alive(self) -> bool:
        """Any process left in this command's session (bash, or the twistd it ran)."""
        sid = self.process.pid
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                return True
        return False

    def terminate(self, deadline: float = 30) -> None:
        """SIGTERM to every process of the command (Ctrl-C's kin), and wait until all have ended."""
        if self.session_alive():
            os.killpg(self.process.pid, signal.SIGTERM)
        end = time.monotonic() + deadline
        while self.session_alive() and time.monotonic() < end:
            time.sleep(0.1)
        self.close()
        assert not self.session_alive(), f"{self.command!r} still runs {deadline} s after SIGTERM"

    def close(self) -> None:
        if self.session_alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.stdout.close()


def run(command: str, cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def in_a_new_shell(command: str) -> str:
    """README, Quick start: C{twistd} and C{pushie} are .venv's, activated in every new shell."""
    if re.match(r"(twistd|pushie) ", command):
        return ". .venv/bin/activate && " + command
    return command


def sse_messages(stream: str) -> list[dict]:
    """The unnamed events (messages) of a text/event-stream, as JSON."""
    messages = []
    for event in stream.replace("\r\n", "\n").split("\n\n"):
        lines = event.split("\n")
        if any(line.startswith("event:") for line in lines):
            continue
        data = "\n".join(line[len("data: ") :] for line in lines if line.startswith("data: "))
        if data:
            messages.append(json.loads(data))
    return messages


# -- the README's own claims -----------------------------------------------


def test_the_readme_commands_name_the_default_port():
    """The walk-through's URLs are the daemon's defaults, as the Quick start says."""
    (default,) = SETTINGS_BY_NAME["listen"].default
    assert default == "tcp:8080:interface=127.0.0.1"
    assert "serves `http://127.0.0.1:8080`" in section("## Quick start")
    urls = re.findall(r"https?://[^/'\s\"]+", " ".join(typed_commands(section(WALK_THROUGH))))
    assert urls and set(urls) == {DEFAULT_URL}, urls


def test_the_quick_start_test_command_is_the_development_one():
    """Both sections give the same command; .ci/run runs its steps (with CI's extra flags)."""
    _, tests = quick_start()
    parsed = subprocess.run(["bash", "-n", "-c", tests], capture_output=True, text=True, check=False)
    assert parsed.returncode == 0, parsed.stderr
    assert shell_blocks(section("## Development"))[0] == tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for step in tests.split(" && "):
        words = [w for w in shlex.split(step) if not w.startswith("-q")]
        if words[:3] == [".venv/bin/pip", "install", ".[test]"]:
            assert re.search(r"^\.venv/bin/pip install -q '\.\[test(,\w+)*\]'$", ci, re.MULTILINE), step
        else:
            assert re.search(r"^" + re.escape(" ".join(words)) + r"( |$)", ci, re.MULTILINE), step


# -- the commands, run ------------------------------------------------------


def test_the_quick_start_and_walk_through_as_typed(tmp_path):
    start_daemon, run_tests = quick_start()
    walk = typed_commands(section(WALK_THROUGH))

    # Sort the walk-through's commands by what they do; an unknown one fails.
    step1 = [c for c in walk if c.startswith("twistd ")]
    publish_curl = [c for c in walk if c.startswith("curl ") and "/publish" in c]
    stream_curl = [c for c in walk if c.startswith("curl -N ") and "/events?" in c]
    cli_publish = [c for c in walk if c.startswith("pushie publish ")]
    known = step1 + publish_curl + stream_curl + cli_publish
    assert [c for c in walk if c not in known] == [], "a new walk-through command: teach this test what it shows"
    assert len(step1) == len(publish_curl) == len(stream_curl) == len(cli_publish) == 1, walk
    assert start_daemon.endswith(" && " + step1[0]), (start_daemon, step1)
    (answer,) = re.findall(r"The answer is `([^`]+)`", section(WALK_THROUGH))
    expected_answer = re.escape(answer).replace(re.escape("..."), '[^"]+')

    folder = fresh_checkout(tmp_path / "pushie")
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    env = newcomer_environment(tmp_path, port)
    shells: list[Shell] = []
    try:
        # Quick start: install and start the daemon with its defaults.
        daemon = Shell(start_daemon, folder, env, logs / "quick-start.log")
        shells.append(daemon)
        log = daemon.wait_for(lambda out: "Pushie listening on" in out, "listening line", INSTALL_DEADLINE)
        # Step 1: the log says where it listens, which engine, and that publishing is open.
        assert f"Pushie listening on tcp:{port}:interface=127.0.0.1 (127.0.0.1:{port})" in log, log
        assert "engine memory" in log and "Publishing is OPEN" in log, log
        assert (folder / ".venv" / "bin" / "pushie").exists()

        # Step 1's command, in a new shell from the same folder: a second daemon starts.
        port2 = free_port()
        second = Shell(in_a_new_shell(step1[0]), folder, newcomer_environment(tmp_path, port2), logs / "step1.log")
        shells.append(second)
        second.wait_for(lambda out: f"Pushie listening on tcp:{port2}:" in out, "listening line", START_DEADLINE)
        assert not (folder / "twistd.pid").exists()

        # Step 3: publish with curl; the answer is the README's.
        published = run(in_a_new_shell(publish_curl[0]), folder, env)
        assert published.returncode == 0, published.stderr
        assert re.fullmatch(expected_answer, published.stdout.strip()), (published.stdout, answer)
        epoch = json.loads(published.stdout)["epoch"]

        # Step 4: follow the channel from a shell; then the command line's publish reaches it.
        # (curl's progress meter goes to stderr, left out.)
        stream = Shell(in_a_new_shell(stream_curl[0]), folder, env, logs / "events.out", stderr=False)
        shells.append(stream)
        stream.wait_for(lambda out: "event: subscribed" in out, "subscribed event", START_DEADLINE)
        cli = run(in_a_new_shell(cli_publish[0]), folder, env)
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout) == {"channel": "bunno", "offset": 2, "epoch": epoch}, cli.stdout
        sent = json.loads(shlex.split(cli_publish[0])[-1])
        stream.wait_for(lambda out: len(sse_messages(out)) >= 1, "message", START_DEADLINE)
        (message,) = sse_messages(stream.output())
        assert (message["channel"], message["offset"], message["data"]) == ("bunno", 2, sent), message

        # Stop the daemon (SIGTERM): it shuts down, and the event stream ends cleanly.
        daemon.terminate()
        assert "Server Shut Down." in daemon.output(), daemon.output()[-3000:]
        stream.process.wait(timeout=30)
        assert stream.process.returncode == 0, stream.output()
        second.terminate()
        assert "Server Shut Down." in second.output()
        assert not (folder / "twistd.pid").exists()

    finally:
        for shell in shells:
            shell.close()

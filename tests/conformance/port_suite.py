"""
Build a Python 3 copy of Autobahn|Testsuite's fuzzing client from PyPI.

    python tests/conformance/port_suite.py [TARGET]

The suite (C{autobahntestsuite} on PyPI, pinned below with its hash) is
Python 2 only and none of its code is kept in this repository.  This script
downloads the sdist with pip, checks its SHA-256, unpacks the
C{autobahntestsuite} package into TARGET (default: C{build/autobahntestsuite}
in the checkout), and ports it mechanically:

1. every module is re-read as Latin-1 (one source byte = one character), which
   is how Python 2 saw its C{str} literals: byte strings.  The payloads of
   cases such as 6.2.1 are UTF-8 text in the source; as Latin-1 they stay the
   exact bytes the Python 2 suite sends;
2. C{python -m lib2to3 -w -n} (print statements, imports, dict methods...);
3. the small patch set in L{PATCHES} below, each with its reason: the suite
   meets Autobahn (today's, the one Pushie runs on) through
   L{_py3compat.Py3Bytes}, which encodes outgoing Latin-1 str as bytes and
   decodes incoming bytes as Latin-1 str.

Only the fuzzing client and the WebSocket cases are used (see run_suite.py);
the suite's WAMP and wsperf modes are ported but never imported.

The result is marked with C{PORTED} (holding the version and this script's
hash) and is rebuilt when either changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from typing import Any

VERSION = "25.10.1"
SHA256 = "b083d6e15330fc16f3e5f0975cce2b15f21bfa0c6db09547316b1852c6dbd6df"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_TARGET = os.path.join(ROOT, "build", "autobahntestsuite")

# (file, pattern, replacement, reason): applied after lib2to3; each must match.
PATCHES: list[tuple[str, str, Any, str]] = [
    (
        "fuzzing.py",
        r"WebSocketClientFactory\.__init__\(self, debug = debug, debugCodePaths = debug\)",
        "WebSocketClientFactory.__init__(self)",
        "today's Autobahn has no debug arguments (it logs through txaio)",
    ),
    (
        "fuzzing.py",
        r"WebSocketServerFactory\.__init__\(self, debug = debug, debugCodePaths = debug\)",
        "WebSocketServerFactory.__init__(self)",
        "same, for the fuzzing server (not used here, kept importable)",
    ),
    (
        "fuzzing.py",
        r"p = ''\.join\(payload\)",
        "p = b''.join(payload)",
        "Autobahn hands a received frame's payload over as a list of bytes",
    ),
    (
        "fuzzing.py",
        r"class FuzzingClientProtocol\(FuzzingProtocol, WebSocketClientProtocol\):",
        "from autobahntestsuite._py3compat import Py3Bytes\n\n"
        "class FuzzingClientProtocol(Py3Bytes, FuzzingProtocol, WebSocketClientProtocol):",
        "the Latin-1 str <-> bytes conversion where the suite meets Autobahn",
    ),
    (
        "fuzzing.py",
        r"\Z",
        "\n\n# Python 3 port: log helpers that accept bytes and Latin-1 str.\n"
        "from autobahntestsuite._py3compat import binLogData, asciiLogData, json_default  # noqa\n",
        "the wire log hexdumps bytes; b2a_hex answers bytes in Python 3",
    ),
    (
        "fuzzing.py",
        r"open\(os\.path\.join\(outdir, report_filename\), 'w'\)",
        "open(os.path.join(outdir, report_filename), 'w', encoding='utf-8')",
        "reports are text files written as UTF-8",
    ),
    (
        "fuzzing.py",
        r"\.encode\(\"utf-8\"\)\)$|ll\.encode\('utf8'\)\)\)$",
        lambda m: ")" if m.group(0).startswith(".") else "ll))",
        "(same) the text goes to a text file: no bytes",
    ),
    (
        "fuzzing.py",
        r"sort_keys = True, indent = 3",
        "sort_keys = True, default = json_default, indent = 3",
        "a case report holds the raw HTTP handshake, which Autobahn keeps as bytes",
    ),
    (
        "case/case.py",
        r"return pickle\.dumps\(obj1\) == pickle\.dumps\(obj2\)",
        "from autobahntestsuite._py3compat import normalise\n"
        "      return pickle.dumps(normalise(obj1)) == pickle.dumps(normalise(obj2))",
        "expected events hold Latin-1 str, a few hold bytes: both are the same bytes",
    ),
    (
        "case/case6_x_x.py",
        r"from autobahn\.websocket\.utf8validator import Utf8Validator",
        "from autobahntestsuite._py3compat import Utf8Validator",
        "Autobahn's validator wants bytes; the case feeds it Latin-1 str",
    ),
    (
        "__init__.py",
        r"^from \. import (wstest|echo|broadcast|testee|choosereactor)\b.*$",
        r"# (port_suite.py) not imported: \g<0>",
        "the fuzzing client needs none of the other modes, which need Autobahn's removed WAMP v1",
    ),
    (
        "*",
        r"\(object, (\w+), \)",
        r"(\1, )",
        "classes built with type(name, (object, Case), ...): no consistent MRO for new-style classes",
    ),
    (
        "case/case9_9_1.py",
        r"^from zope\.interface import implements\n((?:.*\n)*?)"
        r"class FrameProducer:\n\n   implements\(interfaces\.IPushProducer\)",
        "from zope.interface import implementer\n\\1@implementer(interfaces.IPushProducer)\nclass FrameProducer:\n",
        "zope.interface's class advice implements() is Python 2 only",
    ),
    (
        "case/__init__.py",
        r"^(from \.case12_x_x import \*|Cases\.extend\(Case1[23]_X_X\)|"
        r"CaseSubCategories\.update\(Case1[23]_X_X_CaseSubCategories\))$",
        r"# (port_suite.py) no permessage-deflate cases: \g<0>",
        "groups 12 and 13 test permessage-deflate, which Pushie never accepts; their module needs "
        "Autobahn's old PerMessageDeflateOffer arguments",
    ),
    (
        "report.py",
        r"^import jinja2$",
        "jinja2 = None  # (port_suite.py) only the WAMP reports use it; the fuzzing client needs its CSS only",
        "no jinja2 dependency for the WebSocket report",
    ),
    (
        "case/case10_1_1.py",
        r"len\(self\.payload\) / self\.p\.autoFragmentSize",
        "len(self.payload) // self.p.autoFragmentSize",
        "Python 2's integer division: the expected count of full frames (the case fails on 50.41 otherwise)",
    ),
    (
        "*",
        r"^(\s*)import binascii$",
        r"\1from autobahntestsuite import _py3compat as binascii",
        "b2a_hex of a Latin-1 str, answering str (as Python 2 did)",
    ),
]


def download(directory: str) -> str:
    """The sdist, fetched by pip (the ordinary client) and checked against SHA256."""
    name = f"autobahntestsuite-{VERSION}.tar.gz"
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", directory, f"autobahntestsuite=={VERSION}"],
            check=True,
        )  # fmt: skip
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {SHA256}")
    return path


def fingerprint() -> str:
    h = hashlib.sha256(VERSION.encode())
    for name in ("port_suite.py", "_py3compat.py"):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def latin1(path: str) -> None:
    """Rewrite a module so that Python 3 reads each of its bytes as one character (Python 2's str)."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    for i in range(min(2, len(lines))):
        if re.match(rb"^[ \t\f]*#.*?coding[:=]", lines[i]):
            lines[i] = b"# (coding declaration removed by port_suite.py)"
    header = b"# -*- coding: latin-1 -*-\n"
    with open(path, "wb") as f:
        f.write(header + b"\n".join(lines))


def patch(package: str) -> None:
    for filename, pattern, replacement, _reason in PATCHES:
        if filename == "*":
            paths = [os.path.join(d, n) for d, _, ns in os.walk(package) for n in ns if n.endswith(".py")]
        else:
            paths = [os.path.join(package, filename)]
        hits = 0
        for path in paths:
            with open(path, encoding="latin-1") as f:
                text = f.read()
            text, count = re.subn(pattern, replacement, text, flags=re.M)
            if count:
                hits += count
                with open(path, "w", encoding="latin-1") as f:
                    f.write(text)
        if not hits:
            raise SystemExit(f"port_suite: patch for {filename} ({pattern!r}) matched nothing")
    shutil.copy(os.path.join(HERE, "_py3compat.py"), os.path.join(package, "_py3compat.py"))


def port(target: str = DEFAULT_TARGET) -> str:
    """Make sure TARGET holds the ported package; return the directory to put on sys.path."""
    stamp = os.path.join(target, "PORTED")
    mark = fingerprint()
    if os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == mark:
                return target
    if importlib.util.find_spec("lib2to3") is None:
        raise SystemExit("port_suite: this Python has no lib2to3 (removed in 3.13); run the suite with 3.11 or 3.12")
    cache = os.path.join(os.path.dirname(target), "download")
    os.makedirs(cache, exist_ok=True)
    sdist = download(cache)
    work = tempfile.mkdtemp(prefix="ats-port-", dir=os.path.dirname(target))
    try:
        with tarfile.open(sdist) as tar:
            prefix = f"autobahntestsuite-{VERSION}/autobahntestsuite/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(work, members=members, filter="data")
        package = os.path.join(work, f"autobahntestsuite-{VERSION}", "autobahntestsuite")
        for d, _, names in os.walk(package):
            for n in names:
                if n.endswith(".py"):
                    latin1(os.path.join(d, n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            subprocess.run(
                [sys.executable, "-W", "ignore", "-m", "lib2to3", "-w", "-n", package],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        patch(package)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.makedirs(target)
        shutil.move(package, os.path.join(target, "autobahntestsuite"))
        with open(stamp, "w") as f:
            f.write(mark + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(port(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_TARGET))

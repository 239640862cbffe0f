# -*- test-case-name: tests.test_units -*-
"""
Compact JSON encoding for every byte Pushie sends, built once.

Private internals used (checked against CPython 3.11.7, the version the test
suite runs on): C{json.encoder.c_make_encoder}, the C accelerator behind
C{json.JSONEncoder}, undocumented and absent on interpreters without the
C{_json} extension (then the public C{JSONEncoder.encode} is used).  It is
called with the positional arguments CPython 3.11's
C{json.encoder.JSONEncoder.iterencode} passes it; L{tests.test_units} checks
the output byte for byte against C{json.dumps}.
"""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

# json.dumps builds a new encoder for every call with options; this one is built once.
ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


# JSONEncoder.encode still builds its C encoder (and a dict for circular
# reference checks) on every call; this one is built once.  What Pushie
# encodes cannot be circular (data parsed from JSON, or records it builds).
_C_ENCODE = (
    c_make_encoder(None, ENCODER.default, encode_basestring, None, ":", ",", False, False, True)
    if c_make_encoder is not None
    else None
)


def dumps(value: Any) -> bytes:
    """Compact JSON bytes, non-ASCII kept as UTF-8."""
    if _C_ENCODE is not None:
        return "".join(_C_ENCODE(value, 0)).encode("utf-8")
    return ENCODER.encode(value).encode("utf-8")

"""
Python 3 glue for the mechanically ported Autobahn|Testsuite (see port_suite.py).

Copied into the ported package as C{autobahntestsuite._py3compat}; it is our
code, not the suite's.

The suite was written for Python 2, where C{str} is a byte string: its cases
build payloads from string literals (C{"\\xce\\xba"}, C{"*" * 125}, UTF-8 text
in a C{# coding=utf-8} file) and compare what they receive with them.  The
port keeps that model: every case file is read as Latin-1 (so each source
byte becomes one character, exactly Python 2's view of the literal), and this
module converts at the one place the suite meets Autobahn, the WebSocket
protocol: a C{str} going out is encoded as Latin-1 (one character = one
byte), the bytes coming in are decoded as Latin-1.  Nothing is lost or
re-encoded on the way, so what goes on the wire is byte for byte what the
Python 2 suite sends.
"""

import binascii as _binascii

from autobahn.websocket.utf8validator import Utf8Validator as _Utf8Validator


def to_bytes(value):
    """A Python-2-style byte string (str of code points < 256) as bytes; bytes and None unchanged."""
    if isinstance(value, str):
        return value.encode("latin-1")
    return value


def to_str(value):
    """Bytes as a Python-2-style byte string (Latin-1 str)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return value


def normalise(value):
    """For comparing expected and received events: bytes and Latin-1 str are the same thing."""
    if isinstance(value, (bytes, bytearray)):
        return to_str(value)
    if isinstance(value, (list, tuple)):
        return type(value)(normalise(item) for item in value)
    if isinstance(value, dict):
        return {key: normalise(item) for key, item in value.items()}
    return value


# -- a stand-in for the binascii module, as the cases use it ---------------


def b2a_hex(data):
    return _binascii.b2a_hex(to_bytes(data)).decode("ascii")


hexlify = b2a_hex


def a2b_hex(data):
    return to_str(_binascii.a2b_hex(data))


unhexlify = a2b_hex


class Utf8Validator(_Utf8Validator):
    """Autobahn's validator, fed Python-2-style byte strings."""

    def validate(self, data):
        return super().validate(to_bytes(data))


def json_default(value):
    """Reports are JSON: bytes (the HTTP handshake, close reasons) are written as Latin-1 text."""
    if isinstance(value, (bytes, bytearray)):
        return to_str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- the fuzzing protocol's log helpers --------------------------------------


def binLogData(data, maxlen=64):
    data = to_bytes(data)
    if len(data) > maxlen - 4:
        return b2a_hex(data[:maxlen]) + " ..."
    return b2a_hex(data)


def asciiLogData(data, maxlen=64, replace=False):
    raw = to_bytes(data)
    cut = raw[:maxlen]
    try:
        text = cut.decode("utf8", errors="replace" if replace else "strict")
    except UnicodeDecodeError:
        return "0x" + binLogData(raw, maxlen)
    return text + " ..." if len(raw) > maxlen - 4 else text


# -- the protocol boundary ---------------------------------------------------


class Py3Bytes:
    """
    Mixin placed first in the fuzzing client protocol's bases: str payloads
    out become bytes, bytes payloads in become Latin-1 str.
    """

    def sendFrame(self, opcode, payload=b"", fin=True, rsv=0, mask=None, payload_len=None, chopsize=None, sync=False):
        return super().sendFrame(
            opcode,
            payload=to_bytes(payload),
            fin=fin,
            rsv=rsv,
            mask=to_bytes(mask),
            payload_len=payload_len,
            chopsize=chopsize,
            sync=sync,
        )

    def sendMessage(self, payload, isBinary=False, fragmentSize=None, sync=False, doNotCompress=False):
        return super().sendMessage(
            to_bytes(payload), isBinary=isBinary, fragmentSize=fragmentSize, sync=sync, doNotCompress=doNotCompress
        )

    def sendMessageFrame(self, payload, sync=False):
        return super().sendMessageFrame(to_bytes(payload), sync)

    def sendMessageFrameData(self, payload, sync=False):
        return super().sendMessageFrameData(to_bytes(payload), sync)

    def sendPing(self, payload=None):
        return super().sendPing(to_bytes(payload))

    def sendPong(self, payload=None):
        return super().sendPong(to_bytes(payload))

    def sendClose(self, code=None, reason=None):
        # Python 2's sendClose took the reason as text; a Latin-1 str made
        # from UTF-8 source bytes is turned back into that text.
        if isinstance(reason, str):
            reason = reason.encode("latin-1").decode("utf-8")
        return super().sendClose(code, reason)

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False):
        return super().sendCloseFrame(code, to_bytes(reasonUtf8), isReply)

    def onMessage(self, payload, isBinary):
        return super().onMessage(to_str(payload), isBinary)

    def onPong(self, payload):
        return super().onPong(to_str(payload))

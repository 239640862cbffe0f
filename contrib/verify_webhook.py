#!/usr/bin/env python3
"""
Receiving Pushie webhooks: check the signature and the age of a body.

Standard library only; copy `verify_webhook` into your app.  Pass it the RAW
request body (the exact bytes received, before any JSON parsing), the
`X-Pushie-Signature` header and the secret Pushie has in
`PUSHIE_WEBHOOK_SECRET`:

    Flask:   events = verify_webhook(request.get_data(), request.headers.get("X-Pushie-Signature"), SECRET)
    Django:  events = verify_webhook(request.body, request.headers.get("X-Pushie-Signature"), SECRET)

Answer 2xx once the events are handled.  Pushie retries 5xx, 429 and
timeouts for a while; any other answer is final.  A retry sends the very
same bytes, so the signature also identifies a delivery if you want to skip
duplicates.  Deliveries can arrive out of order: order by `time_ms`.

Run this file to get a small receiver that prints what it gets:

    PUSHIE_WEBHOOK_SECRET=... python3 contrib/verify_webhook.py 9000
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

MAX_AGE_SECONDS = 300  # reject bodies signed more than 5 minutes ago (or ahead)
MAX_BODY_BYTES = 1 << 20


class WebhookRejected(Exception):
    """The body is not a genuine, fresh Pushie webhook; `status` is the answer to give."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def verify_webhook(
    body: bytes,
    signature: str | None,
    secret: bytes,
    now: float | None = None,
    max_age: float = MAX_AGE_SECONDS,
) -> list[dict[str, Any]]:
    """
    Return the events of a genuine webhook body, or raise WebhookRejected.

    The signature is checked first, in constant time, before the body is
    parsed; then `time_ms` must be within `max_age` seconds of `now` (the
    current time by default) either way.
    """
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    given = (signature or "").strip().lower()
    if not hmac.compare_digest(expected.encode(), given.encode("ascii", "replace")):
        raise WebhookRejected(401, "bad signature")
    try:
        payload = json.loads(body)
        time_ms = payload["time_ms"]
        events = payload["events"]
    except (ValueError, TypeError, KeyError):
        raise WebhookRejected(400, "not a webhook body") from None
    if not isinstance(time_ms, int) or not isinstance(events, list):
        raise WebhookRejected(400, "not a webhook body")
    now = time.time() if now is None else now
    if abs(now * 1000 - time_ms) > max_age * 1000:
        raise WebhookRejected(401, "too old (or from the future): check the clocks")
    return events


class _Handler(BaseHTTPRequestHandler):
    secret = b""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._answer(413, "too large")
            return
        body = self.rfile.read(length)
        try:
            events = verify_webhook(body, self.headers.get("X-Pushie-Signature"), self.secret)
        except WebhookRejected as e:
            self._answer(e.status, str(e))
            return
        for event in events:
            print(event.get("name"), event.get("channel"), event.get("user_id", ""), flush=True)
        self._answer(204, "")

    def _answer(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    secret = os.environ.get("PUSHIE_WEBHOOK_SECRET", "").encode()
    if not secret:
        sys.exit("set PUSHIE_WEBHOOK_SECRET to the secret Pushie signs with")
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    _Handler.secret = secret
    print(f"listening on http://127.0.0.1:{port}/", flush=True)
    HTTPServer(("127.0.0.1", port), _Handler).serve_forever()


if __name__ == "__main__":
    main()

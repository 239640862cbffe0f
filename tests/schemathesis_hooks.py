"""
schemathesis hooks that sign the Pusher HTTP API's requests (tests/test_openapi.py).

The Pusher API (C{/apps/<app_id>/...}, C{/users/...}; docs/PROTOCOL.md §13)
answers 401 to any request not signed with an app's secret, so requests
generated from the description alone never reach its handlers. Loaded by the
schemathesis CLI through C{SCHEMATHESIS_HOOKS=tests.schemathesis_hooks}, these
hooks sign every generated request as the Pusher server SDKs do:

  - C{map_path_parameters} gives every case the test app's C{app_id};
  - an auth provider (schemathesis's own mechanism, so that its C{ignored_auth}
    check knows the credentials are real and probes the daemon without them)
    marks each case of those paths as one to sign;
  - C{before_call} hands the request a requests auth, L{sign}, which runs on
    the prepared request (final URL and body bytes) and sets C{auth_key},
    C{auth_timestamp}, C{body_md5} and C{auth_signature} with the app given
    in C{PUSHIE_TEST_PUSHER_APP} (C{id:key:secret}).

A case whose signature schemathesis removed on purpose (a negative case, or
the C{ignored_auth} probes, which do not go through C{before_call}) is sent
unsigned and must get its 401. C{filter_case} and C{filter_failure} leave out
the two input rules that JSON Schema cannot write (see L{filter_case}).
C{after_call} appends each operation's status to the file named by
C{PUSHIE_TEST_STATUSES}, so that the test can check that the requests did
reach the handlers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData
from twisted.web.http import parse_qs

APP_ID, APP_KEY, APP_SECRET = os.environ["PUSHIE_TEST_PUSHER_APP"].split(":")
TO_SIGN = "(to be signed in before_call)"
SIGNED_PATHS = r"^/(apps|users)/"


@schemathesis.auth(refresh_interval=None, retry_on=[]).apply_to(path_regex=SIGNED_PATHS)
class PusherSignature:
    """The credential is the test app; C{before_call} turns the mark into a signature."""

    def get(self, case: Any, context: Any) -> str:
        return APP_KEY

    def set(self, case: Any, data: str, context: Any) -> None:
        case.query = {**(case.query or {}), "auth_signature": TO_SIGN}


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """
    A marked case is signed by L{sign} once requests has prepared it (final
    URL and body bytes). The case itself is left alone: schemathesis
    revalidates an edited case, and would count C{auth_signature} (a
    security parameter) as an undeclared query parameter.
    """
    query = case.query
    if not isinstance(query, dict) or query.get("auth_signature") != TO_SIGN:
        return
    kwargs["auth"] = sign


@schemathesis.hook
def map_path_parameters(context: Any, path_parameters: dict[str, Any]) -> dict[str, Any]:
    """The test app's id (set as generated, not in C{before_call}, where schemathesis would revalidate it)."""
    if isinstance(path_parameters.get("app_id"), str):
        return {**path_parameters, "app_id": APP_ID}
    return path_parameters


def sign(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """
    Sign a prepared request as the Pusher server SDKs do. Only the values a
    valid case has are replaced: a parameter that a negative case left out
    or gave the wrong type stays as generated, so that the case stays the
    invalid one schemathesis meant.
    """
    url = urlsplit(request.url)
    body = request.body or b""
    body = body.encode("utf-8") if isinstance(body, str) else body
    fresh = {
        "auth_key": APP_KEY,
        "auth_timestamp": str(int(time.time())),
        "body_md5": hashlib.md5(body).hexdigest(),
    }
    pieces = []
    for piece in url.query.split("&") if url.query else []:
        name, _, value = piece.partition("=")
        if name == "auth_signature":
            continue
        if name in fresh and (name != "auth_timestamp" or re.fullmatch(r"-?[0-9]+", value)):
            piece = f"{name}={fresh[name]}"
        pieces.append(piece)
    query = "&".join(pieces)
    # As the daemon reads it (Twisted's request.args, decoded with "replace"), keys lower-cased and sorted.
    sent = sorted(
        (k.decode("utf-8", "replace").lower(), v.decode("utf-8", "replace"))
        for k, values in parse_qs(query.encode("utf-8"), 1).items()
        for v in values
    )
    text = "\n".join([request.method or "", unquote(url.path), "&".join(f"{k}={v}" for k, v in sent)])
    signature = hmac.new(APP_SECRET.encode(), text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    query = (query + "&" if query else "") + "auth_signature=" + signature
    request.url = url._replace(query=query).geturl()
    return request


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    """
    Leave out what the description cannot say (both are stated in words in
    it): a user id is 1 to 128 printable characters (C{str.isprintable},
    which no JSON Schema pattern spells), in C{user_id} and in
    C{#server-to-user-<id>} channels; and C{info=user_count} is taken only
    with C{filter_by_prefix=presence-} or for a presence- C{channel_name}
    (one parameter's rule depending on another).
    """
    return not _breaks_unwritten_rules(case, case.path_parameters or {})


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """
    A valid request rejected (ST202) only for what C{filter_case} leaves out
    (the coverage phase builds some cases without the generation hooks) is
    not a failure; every other failure is kept. By now the path parameters
    are percent-encoded.
    """
    if not isinstance(failure, RejectedPositiveData):
        return True
    path = {k: unquote(v) if isinstance(v, str) else v for k, v in (case.path_parameters or {}).items()}
    return not _breaks_unwritten_rules(case, path)


def _breaks_unwritten_rules(case: Any, path_parameters: dict[str, Any]) -> bool:
    values = [*path_parameters.values()]
    body = case.body if isinstance(case.body, dict) else {}
    events = body.get("batch") if isinstance(body.get("batch"), list) else [body]
    for event in events:
        if isinstance(event, dict):
            values.append(event.get("channel"))
            values += event.get("channels") if isinstance(event.get("channels"), list) else []
    for value in values:
        user = value.removeprefix("#server-to-user-") if isinstance(value, str) else ""
        if user and not user.isprintable():
            return True
    query = case.query if isinstance(case.query, dict) else {}
    info = query.get("info")
    if not (isinstance(info, str) and "user_count" in info):
        return False
    if case.path.endswith("/channels"):
        prefix = query.get("filter_by_prefix")
        return not (isinstance(prefix, str) and prefix.startswith("presence-"))
    channel = path_parameters.get("channel_name")
    return isinstance(channel, str) and not channel.startswith("presence-")


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    path = os.environ.get("PUSHIE_TEST_STATUSES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{case.method} {case.path} {response.status_code} {response.text[:200]!r}\n")

"""The note on an httpx error the mesh re-raises says why the call was not retried.

Pure logic (``meshlib.http.attempt.not_retried``): a table of call ends against the retry
settings that decide them. The POST case runs end to end through a resetting server in
``tests/integration/test_http_mesh.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from meshlib.core.call import AttemptResult, CallEnd
from meshlib.core.outcome import Outcome
from meshlib.core.retry import FailReason
from meshlib.http.attempt import not_retried

RESET = AttemptResult(Outcome.RESET, None, httpx.ReadError("reset"))


def end(stopped: str | None, attempts: int = 1) -> CallEnd:
    return CallEnd(RESET, attempts, stopped=stopped)


def retry(allow_post: bool = False) -> SimpleNamespace:
    return SimpleNamespace(allow_post_with_idempotency_key=allow_post)


class MethodOnly:
    """All that ``not_retried`` may read of a request (the shim passes no more)."""

    def __init__(self, method: str, **_headers: str) -> None:
        self.method = method


def req(method: str, **headers: str) -> Any:
    return MethodOnly(method, **headers)


KEY = {"Idempotency-Key": "k"}


@pytest.mark.parametrize(
    ("request_", "end_", "retry_", "want"),
    [
        (req("POST"), end(FailReason.NOT_IDEMPOTENT), retry(),
         "not retried: POST is not idempotent (RFC 9110 9.2.2) and the request may have "
         "reached the service; to allow retrying it, send an Idempotency-Key header and set "
         "retries.allow_post_with_idempotency_key: true in the policy of 'orders' "
         "(docs/policy.md)"),
        (req("POST", **KEY), end(FailReason.NOT_IDEMPOTENT), retry(),
         "not retried: POST is not idempotent (RFC 9110 9.2.2) and the request may have "
         "reached the service; to allow retrying it, send an Idempotency-Key header and set "
         "retries.allow_post_with_idempotency_key: true in the policy of 'orders' "
         "(docs/policy.md)"),
        (req("POST"), end(FailReason.NOT_IDEMPOTENT), retry(allow_post=True),
         "not retried: POST is not idempotent (RFC 9110 9.2.2) and the request may have "
         "reached the service; the policy of 'orders' retries a POST only when it carries an "
         "Idempotency-Key header"),
        (req("PATCH"), end(FailReason.NOT_IDEMPOTENT), retry(),
         "not retried: PATCH is not idempotent (RFC 9110 9.2.2) and the request may have "
         "reached the service; only failures to connect are retried for it"),
        (req("DELETE"), end(FailReason.NOT_IDEMPOTENT), retry(),
         "not retried: DELETE is not in retries.methods of the policy of 'orders' "
         "(docs/policy.md)"),
        (req("PUT"), end(FailReason.NOT_REPLAYABLE), retry(),
         "not retried: the request body is a stream, which is sent only once (pass it as "
         "bytes, e.g. content=b'...', to allow retries)"),
        (req("GET"), end(FailReason.ATTEMPTS_EXHAUSTED, 3), retry(),
         "retries.attempts of the policy of 'orders' used up"),
        (req("GET"), end(None), retry(),
         "not retried: retries.retry_on of the policy of 'orders' does not select this "
         "failure (reset)"),
    ],
    ids=["post", "post-with-key", "post-policy-allows-no-key", "patch", "method-not-listed",
         "stream", "attempts", "retry-on"],
)
def test_why_not_retried(request_, end_, retry_, want):
    assert not_retried(request_, "orders", end_, retry_) == want

"""meshlib.context: the inherited-deadline variable read by the client drivers."""

from __future__ import annotations

import asyncio
import contextvars

import httpx

from meshlib.context import DeadlineVar, current_deadline
from meshlib.core.deadline import Deadline
from meshlib.http.attempt import request_deadline


def test_deadline_var_behaves_like_a_context_var_and_remembers_a_set():
    var = DeadlineVar("t")
    assert var.name == "t" and var.get() is None and not var.ever_set
    token = var.set(None)  # setting "no deadline" does not switch the readers on
    assert not var.ever_set
    var.reset(token)
    d = Deadline(123.0)
    token = var.set(d)
    assert var.ever_set and var.get() is d
    var.reset(token)
    assert var.get() is None and var.ever_set  # stays on: other contexts may hold one


def test_deadline_var_values_follow_contexts():
    var = DeadlineVar("t")
    d = Deadline(5.0)

    def inner() -> Deadline | None:
        var.set(d)
        return var.get()

    assert contextvars.copy_context().run(inner) is d
    assert var.get() is None  # the copy's value did not leak out

    async def task() -> Deadline | None:
        return var.get()

    async def main() -> tuple[Deadline | None, Deadline | None]:
        var.set(d)
        seen = await asyncio.create_task(task())  # tasks copy the current context
        return seen, var.get()

    assert contextvars.copy_context().run(asyncio.run, main()) == (d, d)


def test_a_deadline_set_by_user_code_is_inherited_by_client_calls():
    """docs/http.md: without the middleware, set ``current_deadline`` yourself."""
    req = httpx.Request("GET", "http://orders/x")

    def run() -> tuple[Deadline | None, Deadline | None]:
        d = Deadline(1000.0)
        current_deadline.set(d)
        own = httpx.Request("GET", "http://orders/x", extensions={"mesh_timeout": 2000.0})
        return request_deadline(req, 0.0), request_deadline(own, 0.0)

    inherited, earliest = contextvars.copy_context().run(run)
    assert inherited is not None and inherited.at == 1000.0
    assert earliest is not None and earliest.at == 1000.0  # the earlier of the two wins

"""The Celery names the worker uses that Celery does not document, behind one door.

Each function reaches one such name; its comment names the upstream code it relies on and the
release read. tests/test_upstream_canaries.py exercises that code and fails, naming the
installed Celery, the day it changes. The other two doors are kombu's Redis transport
(worker/redis_transport.py) and urllib3's connection (tasks/core/http.py). A new private name goes
behind one of these three doors, with its canary; tests/test_upstream_canaries.py counts them.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.concurrency import asynpool, prefork
from celery.worker import state as worker_state


def result_meta(backend: Any, result: Any, state: str, traceback: Any, request: Any) -> Any:
    """The dict Celery's key-value backends store for a task's state: status, result,
    traceback, children, date_done, and what `result_extended` adds.

    celery/backends/base.py, `Backend._get_result_meta` (read in 5.7.0): the one builder of the
    stored format, which clients, Flower and other languages' producers read. No public method
    returns it without also writing it, and a copy here would drift from Celery's silently."""
    return backend._get_result_meta(
        result=result, state=state, traceback=traceback, request=request
    )


def running_requests() -> list[Any]:
    """The requests this worker process is running now (in its pool), at the time of the call.

    celery/worker/state.py, `active_requests` (read in 5.7.0): a WeakSet the consumer fills when
    the pool accepts a request and empties when it is ready. The module is Celery's "internal
    worker state"; the only public view of it, `inspect active`, is a broadcast over the broker,
    which a worker shutting down cannot wait on."""
    return list(worker_state.active_requests)


def rank_state_between(custom: str, higher: str, lower: str) -> None:
    """Have event monitors (Flower's `celery.events.state`) rank the custom state `custom` below
    the built-in `higher` and above the built-in `lower`: an event of `custom` replaces `lower`
    and is replaced by `higher`, and two custom states ranked alike replace each other in the
    order their events arrive. Celery's table is one global, so this is set for the whole
    process, once; a rank already given is kept.

    celery/states.py, `PRECEDENCE_LOOKUP` (read in 5.7.0): the dict `precedence()` and
    `state.__lt__` read (a lower number wins); a state missing from it ranks above REVOKED and
    STARTED. Celery has no setting or hook for a custom state's rank."""
    rank = (states.precedence(higher) + states.precedence(lower)) / 2
    states.PRECEDENCE_LOOKUP.setdefault(custom, rank)


class _ChildTrackingPool(asynpool.AsynPool):  # type: ignore[misc]
    """Celery's prefork pool, minus one crash: a child that exited, and whose exit the pool has
    handled, is not watched again when the consumer registers the pool anew.

    celery/concurrency/asynpool.py, `AsynPool._track_child_process` (read in 5.7.0): it watches
    a child's `_sentinel_poll`, the fd `_untrack_child_process` sets to None once the child has
    exited. `register_with_event_loop` tracks every child still in the pool's list, and after a
    lost broker connection the consumer registers the pool again: a child that exited in between
    (recycled, or killed) is still in the list until `maintain_pool` reaps it, and its None
    reaches `hub.add_reader`, whose ValueError (not the OSError `iterate_file_descriptors_safely`
    forgives) ends the worker."""

    def _track_child_process(self, proc: Any, hub: Any) -> None:
        if getattr(proc, "_sentinel_poll", 0) is None:
            return  # exited and untracked: maintain_pool replaces it
        super()._track_child_process(proc, hub)


class PreforkPool(prefork.TaskPool):  # type: ignore[misc]
    """The worker's pool (`worker_pool`): Celery's prefork, with the pool class above."""

    Pool = _ChildTrackingPool

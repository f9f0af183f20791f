"""A download's journey (its fault budget and waits, carried in message headers) and parking (its
message kept in Redis while it waits for a slot, then published again), in-process: the
publishing app is a recorder, the budget the real primitive on the session's private Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from download_client.contract import TASK_NAME
from download_client.settings import Settings
from tasks import parking, runtime
from tasks.core import budgets, origins
from tasks.core.budgets import Busy, Seat
from tasks.core.ledger import Ledger
from tasks.retries import WAIT_CAP_S, Journey, fault_delay, wait_delay

DB = 9


def _task(headers: dict[str, Any] | None = None, **request: Any) -> Any:
    fields = {
        "id": "t1",
        "args": [],
        "kwargs": {"url": "http://127.0.0.1:9/x", "dest": "a.bin"},
        "delivery_info": {"routing_key": "q1"},
        "retries": 2,
        "headers": headers or {},
        **request,
    }
    return SimpleNamespace(request=SimpleNamespace(**fields))


class Recorder:
    """What an app's send_task was asked to publish."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **options: Any) -> None:
        self.sent.append({"name": name, **options})


@pytest.fixture
def settings() -> Settings:
    s = Settings.from_env({"CELERY_BROKER_URL": "redis://127.0.0.1:9/0"})
    runtime.configure(s)
    return s


@pytest.fixture
def ledger(redis_server) -> Iterator[Ledger]:
    client = redis.Redis.from_url(f"{redis_server.url}/{DB}")
    client.flushdb()
    yield Ledger(client)
    with budgets._renewer.lock:
        budgets._renewer.leases.clear()
    client.flushdb()
    client.close()


def test_a_journey_travels_in_the_headers_and_survives_bad_ones():
    journey = Journey.of(_task()).begun(100.0).after_fault().after_wait(2.5, "holder")
    again = Journey.of(_task(journey.headers(_task({"other": "kept"}))))
    assert again == Journey(faults=1, waits=1, waited_s=2.5, waiting_for="holder", first_at=100.0)
    assert journey.headers(_task({"other": "kept"}))["other"] == "kept"
    assert again.begun(200.0).first_at == 100.0  # the first attempt's time is kept
    assert Journey.of(_task({"download_faults": "many"})) == Journey()


def test_waits_and_faults_are_bounded(settings):
    assert all(0 < wait_delay(n) <= WAIT_CAP_S for n in range(40))
    assert all(0 <= fault_delay(settings, n, None) <= settings.retry_backoff_max for n in range(40))
    assert fault_delay(settings, 0, 10**6) == settings.retry_backoff_max


def test_a_wait_of_an_hour_costs_a_waiter_a_few_hundred_re_sends():
    waited, sends = 0.0, 0
    while waited < 3600:
        waited += wait_delay(sends)
        sends += 1
    assert sends <= 3600 / (0.8 * WAIT_CAP_S) + 5  # at worst one every 8 s once capped


def test_a_parked_message_is_published_again_as_it_was_with_its_wait_added(settings):
    headers = {"download_waits": 3, "download_waited_s": 1.5, "celery_own": "dropped"}
    message = parking.message(_task(headers))
    parked_at = json.loads(message)["parked_at"]
    app = Recorder()
    parking.publish(app, [message])
    (sent,) = app.sent
    assert sent["name"] == TASK_NAME
    assert (sent["task_id"], sent["queue"], sent["retries"]) == ("t1", "q1.woken", 2)
    assert sent["kwargs"] == {"url": "http://127.0.0.1:9/x", "dest": "a.bin"}
    assert set(sent["headers"]) == {"download_waits", "download_waited_s"}
    waited = sent["headers"]["download_waited_s"]
    assert 1.5 <= waited <= 1.5 + (time.time() - parked_at) + 0.01
    # Parked for a slot somewhere, it says where: that slot is kept for it once it is woken.
    parking.publish(app, [parking.message(_task(headers), scope="origin http://a:80")])
    assert app.sent[-1]["headers"][parking.WOKEN_FOR] == "origin http://a:80"


def test_parked_downloads_are_woken_in_order_and_published_by_whoever_released(settings, ledger):
    slots = origins.budget(lambda origin: 1)
    origin = origins.origin_of("HTTP://Example.com/x")
    assert origin == "http://example.com:80"
    holder = Seat(slots, ledger, "h", lambda scope: parking.message(_task(id="h")))
    holder.enter(origin)
    for i in range(3):
        seat = Seat(
            slots,
            ledger,
            f"p{i}",
            lambda scope, i=i: parking.message(_task(id=f"p{i}"), scope=scope),
        )
        with pytest.raises(Busy):
            seat.enter(origin)
    app = Recorder()
    holder.leave()
    parking.publish(app, holder.woken)
    assert [s["task_id"] for s in app.sent] == ["p0"]
    assert slots.sweep(ledger) == []  # the slot is reserved for p0: nobody else is woken

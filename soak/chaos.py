"""The chaos driver: at random moments it SIGKILLs a worker child, restarts a worker with SIGTERM
(a deploy), or crashes Redis for a while; and it watches for workers that die on their own."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

from celery import Celery

from tests.harness import RedisServer, Worker
from tests.rabbitmq import RabbitServer

# A worker restarted while Redis comes and goes may take minutes to answer: Celery's reconnect
# backoff grows to 30 s between tries, and each try can fall in an outage.
READY_WITHIN_S = 300.0


@dataclass
class Event:
    at: float
    kind: str
    detail: str = ""
    end: float = 0.0


@dataclass
class Chaos:
    redis: RedisServer
    client: Celery
    workers: list[Worker]
    rng: random.Random
    outage: tuple[float, float]
    pause: tuple[float, float]
    stop_timeout: float
    redis_kills: int = 0  # when set: nothing but this many Redis crashes
    # Redis is crashed on a timer of its own, whatever else the driver is doing (a restart waits
    # up to a minute): this long after the last outage ended, so a crash begins at least every
    # 30 + 25 s.
    redis_gap: tuple[float, float] = (5.0, 25.0)
    # A RabbitMQ node as the broker (SOAK_BROKER=rabbitmq): crashed in turn with Redis, which
    # then holds only the results.
    node: RabbitServer | None = None
    events: list[Event] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self, until: float) -> None:
        actions = [self.kill_child] * 5 + [self.restart_worker] * 2
        if self.node is not None:
            actions.append(self.node_outage)
        crashes = None
        if self.redis_kills:
            actions = [self.redis_outage]
        else:
            crashes = threading.Thread(target=self._crash_redis, args=(until,), daemon=True)
            crashes.start()
        while time.monotonic() < until and not self.stopping.is_set():
            if self.redis_kills and self._crashes() >= self.redis_kills:
                break
            if self.stopping.wait(self.rng.uniform(*self.pause)):
                break
            self.revive_the_dead()
            self.rng.choice(actions)()
        if crashes is not None:
            crashes.join()
        self.revive_the_dead()

    def _crash_redis(self, until: float) -> None:
        rng = random.Random(self.rng.random())  # its own draws: the main loop's stay as they were
        while not self.stopping.wait(rng.uniform(*self.redis_gap)):
            if time.monotonic() >= until:
                return
            self.redis_outage(rng)

    def _crashes(self) -> int:
        return sum(e.kind == "Redis SIGKILLed" for e in self.events)

    def record(self, kind: str, detail: str = "") -> Event:
        event = Event(time.monotonic(), kind, detail)
        self.events.append(event)
        return event

    def kill_child(self) -> None:
        worker = self.rng.choice(self.workers)
        children = worker.children() if worker.proc and worker.proc.poll() is None else []
        if children:
            pid = self.rng.choice(children)
            os.kill(pid, signal.SIGKILL)
            self.record("child SIGKILLed", f"{worker.name} pid {pid}").end = time.monotonic()

    def restart_worker(self) -> None:
        worker = self.rng.choice(self.workers)
        event = self.record("worker restarted (SIGTERM)", worker.name)
        code = worker.stop(signal.SIGTERM, timeout=self.stop_timeout)
        event.detail += f", exit {code}"
        worker.start(self.client, READY_WITHIN_S)
        event.end = time.monotonic()

    def redis_outage(self, rng: random.Random | None = None) -> None:
        seconds = (rng or self.rng).uniform(*self.outage)
        event = self.record("Redis SIGKILLed", f"{seconds:.1f} s")
        self.redis.kill()
        time.sleep(seconds)  # the outage itself
        self._start_redis()
        event.end = time.monotonic()

    def _start_redis(self, tries: int = 5) -> None:
        """Start Redis again; one that does not answer in time (a loaded machine) is killed and
        started once more, so an outage never outlives the soak's faults by accident."""
        for _ in range(tries - 1):
            try:
                self.redis.start()
                return
            except AssertionError:
                self.redis.kill()
        self.redis.start()

    def node_outage(self) -> None:
        assert self.node is not None
        seconds = self.rng.uniform(*self.outage)
        event = self.record("RabbitMQ node SIGKILLed", f"{seconds:.1f} s")
        self.node.kill()
        time.sleep(seconds)
        self.node.start()
        event.end = time.monotonic()

    def revive_the_dead(self) -> None:
        """A worker that exited without being asked is a finding: record it, then start it."""
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is not None:
                code = worker.proc.returncode
                worker.stop()
                self.record("worker died on its own", f"{worker.name}, exit {code}")
                worker.start(self.client, READY_WITHIN_S)

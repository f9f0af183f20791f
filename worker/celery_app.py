"""Building the Celery application from a settings object: its configuration, the task and
the parts of the worker that hook into Celery's signals."""

from __future__ import annotations

from typing import Any, ClassVar

from celery import Celery, states
from celery.loaders.app import AppLoader

from download_client.brokers import is_rabbitmq, rabbitmq_config, whole_seconds
from download_client.contract import TASK_NAME, WAITING
from download_client.redact import add_secret_params, redact_reprs
from download_client.settings import Settings
from tasks import runtime
from tasks.callback import CallbackTask
from tasks.fetch import FetchTask
from worker import (
    groups,
    lanes,
    lifecycle,
    metrics,
    redis_transport,
    revoked,
    shutdown,
    sweeper,
)
from worker.celery_internals import rank_state_between


def celery_config(s: Settings) -> dict[str, Any]:
    """Celery's configuration for these settings; the why of each line is in docs/settings.md."""
    # kombu looks for messages of dead workers (past the visibility timeout) every 10 s but scans
    # Redis only every 10th look: once a look keeps that wait at 10 s instead of 100 s.
    transport = {"visibility_timeout": s.visibility_timeout, "unacked_restore_throttle": 1}
    return {
        "broker_url": s.broker_url,
        "result_backend": s.result_backend,
        # Pickle from anyone who can reach the broker is code execution; a message in another
        # content type is refused (logged and dropped) and never deserialized.
        "accept_content": ["json"],
        "task_serializer": "json",
        "result_serializer": "json",
        "result_accept_content": ["json"],
        # A child killed mid-download (OOM, SIGKILL) requeues its message instead of losing it.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Left off on purpose. Cancelling running tasks on a broker connection loss writes their
        # RETRY state to Redis; in a real Redis outage that write fails and Celery then records the
        # task as REVOKED, so the redelivered copy is skipped and the download is lost (seen in
        # tests/test_redis_outage_e2e.py). Running downloads finish instead; the redelivered copy
        # waits on the destination lock and then finds the file unchanged (304): no double write.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": s.visibility_timeout},
        "result_expires": s.result_expires,
        # Our own key, read by DurableRedisBackend: how long a final state waits for Redis.
        "download_result_outage": s.result_outage,
        "task_soft_time_limit": s.soft_time_limit,
        "task_time_limit": s.time_limit,
        # Events make Flower see tasks; task-sent is read on the producer side.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        # `celery worker --concurrency` still wins over this when given.
        "worker_concurrency": s.concurrency,
        "worker_max_tasks_per_child": s.max_tasks_per_child or None,
        "worker_max_memory_per_child": s.max_memory_per_child or None,
        # Celery kills a new child that has not said it is up within 4 s; on two busy cores a
        # child's start took longer ("Timed out waiting for UP message" in the chaos soak), and
        # each kill costs another fork.
        "worker_proc_alive_timeout": 30,
        "worker_hijack_root_logger": False,
        # Refused messages: one line in the log (never their content) and a FAILURE for their
        # producer, stored only where no state exists (worker/refusals.py).
        "worker_consumer": "worker.refusals:Consumer",
        # Celery's prefork pool, which survives a child that exits while the broker reconnects
        # (worker/celery_internals.py); another `celery worker --pool` (solo, threads) still wins.
        "worker_pool": "worker.celery_internals:PreforkPool",
        "broker_connection_max_retries": None,
        **rabbitmq_config(s),
    }


class DownloadsLoader(AppLoader):  # type: ignore[misc]
    """Celery's loader, with results for `redis://` and `rediss://` URLs going through
    DurableRedisBackend (worker/backend.py); any other backend is Celery's own.

    `override_backends` is the loader's table of backend aliases, which Celery reads over its
    own when it picks a backend class for a URL's scheme (celery/app/backends.py, `by_name`).
    The URL itself stays as configured: Celery lets the CELERY_RESULT_BACKEND environment
    variable win over the configured `result_backend` (celery/app/utils.py), which would drop a
    `module:Class+redis://` prefix there, and producers read the same URL."""

    override_backends: ClassVar[dict[str, str]] = {
        "redis": "worker.backend:DurableRedisBackend",
        "rediss": "worker.backend:DurableRedisBackend",
    }


class DownloadsCelery(Celery):  # type: ignore[misc]
    """Whoever publishes `downloads.fetch` through this app (Flower's REST API runs `-A worker`;
    the worker's own retries) sends redacted argsrepr/kwargsrepr: the task-sent event carries
    them, and Flower shows them for as long as the task waits in the queue."""

    def send_task(self, name: str, *args: Any, **options: Any) -> Any:
        if name == TASK_NAME and options.get("kwargsrepr") is None:
            call_args = options.get("args", args[0] if args else None) or ()
            call_kwargs = options.get("kwargs", args[1] if len(args) > 1 else None) or {}
            options["argsrepr"], options["kwargsrepr"] = redact_reprs(call_args, call_kwargs)
        if is_rabbitmq(self.conf.broker_url or "") and options.get("countdown"):
            options["countdown"] = whole_seconds(options["countdown"])
        return super().send_task(name, *args, **options)


def create_app(settings: Settings) -> DownloadsCelery:
    """The worker's app for these settings, with the task, the per-process lifecycle, the
    shutdown bound, the sweeper, the revoke clean-up and the metrics connected."""
    app = DownloadsCelery("downloads", loader=DownloadsLoader)
    app.conf.update(celery_config(settings))
    app.register_task(FetchTask())
    app.register_task(CallbackTask())
    runtime.configure(settings)
    add_secret_params(settings.redact_params)
    rank_running_and_waiting()
    redis_transport.register()
    for part in (lanes, groups, lifecycle, shutdown, sweeper, revoked, metrics):
        part.connect(app, settings)
    return app


def rank_running_and_waiting() -> None:
    """How event monitors (Flower) merge a download's events, which arrive in no fixed order
    (the worker's main process buffers its own, a task's child sends at once): PROGRESS (the
    child's "it runs") and WAITING (the child's "it waits") rank alike, so the later of the two
    is shown, between REVOKED and STARTED: every final state and REVOKED replace them, and
    STARTED or RECEIVED arriving late never do. Celery keeps this table in one global, so it is
    set here, once, for everyone."""
    for custom in ("PROGRESS", WAITING):
        rank_state_between(custom, states.REVOKED, states.STARTED)

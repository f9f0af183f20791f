"""The Celery application, configured in one place from the settings object."""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker.settings import Settings

settings = Settings.from_env()


def celery_config(s: Settings) -> dict[str, Any]:
    """Celery's configuration for these settings; the why of each line is in the README."""
    transport = {"visibility_timeout": s.visibility_timeout}
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
        "result_backend_transport_options": transport,
        "result_expires": s.result_expires,
        "task_soft_time_limit": s.soft_time_limit,
        "task_time_limit": s.time_limit,
        # Events make Flower see tasks; task-sent is read on the producer side.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "worker_max_tasks_per_child": s.max_tasks_per_child or None,
        "worker_max_memory_per_child": s.max_memory_per_child or None,
        "worker_hijack_root_logger": False,
        "broker_connection_max_retries": None,
    }


app = Celery("downloads", include=["tasks.fetch"])
app.conf.update(celery_config(settings))

import worker.lifecycle  # noqa: E402, F401  (connects the per-process signal handlers)

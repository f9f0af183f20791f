"""What other services install to use the download workers: the task's contract (name, arguments,
result keys), the settings a producer needs, a Python client and the `downloads` command. It
imports nothing of the worker, so a service with its own `tasks` module can use it."""

from download_client.client import connect, submit, submit_many, wait
from download_client.contract import RESULT_KEYS, TASK_NAME, DownloadResult

__all__ = ["RESULT_KEYS", "TASK_NAME", "DownloadResult", "connect", "submit", "submit_many", "wait"]

"""The worker: `celery -A worker worker|flower` finds `app` here. This is the one place that reads
the environment at import, because Celery's command line needs a ready app object; everything
else is built from the settings object passed to `create_app`."""

from download_client.settings import Settings
from worker.celery_app import create_app

app = create_app(Settings.from_env())

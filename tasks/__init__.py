"""The Celery task and the download core under it (`tasks.core`: no Celery)."""

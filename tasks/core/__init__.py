"""The download core: storage, HTTP, transfer, claims. Plain functions and classes, no Celery."""

"""The download task and the plain code under it."""

# The public name other services submit to; it never changes with module paths.
TASK_NAME = "downloads.fetch"

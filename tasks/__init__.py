"""The download task and the plain code under it."""

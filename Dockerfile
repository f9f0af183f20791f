FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DOWNLOAD_DIR=/data/downloads
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
COPY client ./client
# A named volume starts as a copy of the directory it is mounted on, owner included: the
# downloads and Flower's state file stay writable by the non-root user.
RUN pip install --no-cache-dir ./client . \
 && useradd --create-home --uid 10001 downloads \
 && mkdir -p /data/downloads /data/flower && chown -R downloads /data
USER downloads
CMD ["celery", "-A", "worker", "worker", "-l", "info"]

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DOWNLOAD_DIR=/data/downloads
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
COPY download_client ./download_client
RUN pip install --no-cache-dir . \
 && useradd --create-home --uid 10001 downloads \
 && mkdir -p /data/downloads && chown -R downloads /data
USER downloads
CMD ["celery", "-A", "worker", "worker", "-l", "info"]

# The stream-cl learner image (used by compose.yaml for the `stream-cl` service and the `replayer`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, pinned and CPU-only: an unpinned install would pull the multi-GB CUDA wheels.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY consumers consumers
COPY buffers buffers
COPY monitoring monitoring
COPY stream_cl stream_cl
RUN pip install .

RUN useradd --uid 10001 --create-home streamcl \
    && mkdir -p /var/lib/stream-cl/checkpoints \
    && chown -R streamcl /var/lib/stream-cl
USER streamcl

EXPOSE 9108
ENTRYPOINT ["stream-cl"]
CMD ["serve", "--config", "/etc/stream-cl/serve.yaml"]

# The stream-cl learner image (used by compose.yaml for the `stream-cl` service and the `replayer`).
#   docker build -t stream-cl .                      CPU torch on python:3.11-slim
#   docker build -t stream-cl:cuda --build-arg BASE_IMAGE=<CUDA image with Python 3.11+ and pip> \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run -p 9108:9108 stream-cl                serve with deploy/image.yaml's settings
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
# The torch wheel index: CPU by default (an unpinned PyPI torch pulls GBs of CUDA wheels).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies in their own layers, before any code: editing the code never reinstalls torch.
COPY pyproject.toml deploy/constraints.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" -c constraints.txt torch
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements.txt \
    && pip install -c constraints.txt -r requirements.txt

COPY README.md LICENSE ./
COPY consumers consumers
COPY buffers buffers
COPY monitoring monitoring
COPY stream_cl stream_cl
RUN pip install --no-deps . && pip check

COPY deploy/image.yaml /etc/stream-cl/serve.yaml
ENV STREAMCL_CONFIG=/etc/stream-cl/serve.yaml

RUN useradd --uid 10001 --create-home streamcl \
    && mkdir -p /var/lib/stream-cl/checkpoints \
    && chown -R streamcl /var/lib/stream-cl
USER streamcl

EXPOSE 9108
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=3)"]
ENTRYPOINT ["stream-cl"]
CMD ["serve"]

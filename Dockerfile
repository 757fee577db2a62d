# The worker image: `python worker.py` (and `python starter.py ...` for operators, `python -m sandbox`).
# Multi-stage: dependencies are built in a throwaway stage; the runtime stage has no compiler,
# no pip cache and runs as an unprivileged user.
#   docker build -t bouncer-pipeline-worker .

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /venv
WORKDIR /src
# Dependencies first (a layer that survives code changes), then the code.
COPY pyproject.toml ./
RUN mkdir -p workflows activities bouncer sandbox db ops bench \
 && for d in workflows activities bouncer sandbox db ops bench; do touch $d/__init__.py; done \
 && touch settings.py worker.py starter.py devstack.py callbacks.py \
 && /venv/bin/pip install . \
 && /venv/bin/pip uninstall -y bouncer-pipeline
COPY . .
RUN /venv/bin/pip install --no-deps . && /venv/bin/python -c "import worker, starter"

FROM python:3.12-slim AS runtime
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin worker
COPY --from=build /venv /venv
WORKDIR /app
COPY --from=build --chown=root:root /src/*.py /app/
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    METRICS_LISTEN=0.0.0.0:9464 CALLBACK_LISTEN=0.0.0.0:8298
USER 10001
# 9464: /metrics, /healthz, /readyz; 8298: Bouncer's completion callbacks.
EXPOSE 9464 8298
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/readyz', timeout=2)"]
# SIGTERM drains: running activities get SHUTDOWN_GRACE_S to finish (give the container more).
STOPSIGNAL SIGTERM
CMD ["python", "worker.py"]

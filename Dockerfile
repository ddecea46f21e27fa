# syntax=docker/dockerfile:1
#
# The raytrieval image: the `raytrieval` CLI, Ray (the KubeRay pods run `ray start` from it),
# the Serve app, and the MLflow server of k8s/mlflow.yaml.
#
#   docker build -t raytrieval:0.1.0 .                                  # faiss-cpu
#   docker build -t raytrieval:0.1.0-gpu --build-arg EXTRAS=gpu .       # GPU faiss instead
#   docker build -t raytrieval:0.1.0 --build-arg EXTRAS=colmap .        # + COLMAP clusters (pycolmap)
#
# torch from PyPI is the CUDA build, so the default image already trains on NVIDIA GPUs; the
# gpu extra only swaps faiss-cpu for faiss-gpu (GPU index search). Ray's image conventions:
# `ray` on the PATH of a login shell (KubeRay starts pods with `bash -lc`), bash and wget (its
# probes), a non-root user 1000 with home /home/ray. The pods of k8s/ run it with a read-only
# root filesystem: /tmp and /home/ray are emptyDirs there, so nothing may be needed from them.

ARG PYTHON_VERSION=3.11

# ---- build the wheel (keeps the build tree out of the final image)
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime
FROM python:${PYTHON_VERSION}-slim
# Must equal `rayVersion` in k8s/*.yaml, inside the range of pyproject.toml.
ARG RAY_VERSION=2.60.0
# Extras of the raytrieval package to install: "" (faiss-cpu) or "gpu" (faiss-gpu).
ARG EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates procps \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/ray --shell /bin/bash ray

# Into the interpreter's own site-packages (/usr/local): console scripts land in
# /usr/local/bin, which Debian's /etc/profile keeps on the PATH of login shells (a venv's bin
# would be dropped by `bash -l`). psycopg2 is for the MLflow server's PostgreSQL store,
# Flask-WTF for its basic-auth app (mlflow's `auth` extra; k8s/mlflow.yaml runs it).
# With EXTRAS=gpu: faiss-cpu (a base dependency) and faiss-gpu write the same `faiss`
# package, so both are removed and the GPU build is reinstalled alone.
COPY --from=build /wheels /wheels
RUN set -eux; \
    wheel="$(ls /wheels/raytrieval-*.whl)"; \
    echo "ray==${RAY_VERSION}" > /tmp/constraints.txt; \
    pip install --root-user-action=ignore --constraint /tmp/constraints.txt \
        "${wheel}${EXTRAS:+[${EXTRAS}]}" "psycopg2-binary>=2.9" "Flask-WTF<2"; \
    case ",${EXTRAS}," in \
      *,gpu,*) \
        pip uninstall --root-user-action=ignore -y faiss-cpu faiss-gpu-cu12; \
        pip install --root-user-action=ignore --constraint /tmp/constraints.txt "faiss-gpu-cu12>=1.8" ;; \
    esac; \
    ray --version; \
    raytrieval --help > /dev/null; \
    python -c "import faiss, torch, mlflow, mlflow.server.auth, psycopg2, raytrieval.serving.app"; \
    rm -rf /wheels /tmp/constraints.txt /tmp/raytrieval-ray-*

USER 1000:1000
WORKDIR /home/ray
ENV HOME=/home/ray

# 6379 GCS, 8265 dashboard / job server, 10001 Ray client, 8000 Serve HTTP, 5000 MLflow.
EXPOSE 6379 8265 10001 8000 5000

CMD ["raytrieval", "--help"]

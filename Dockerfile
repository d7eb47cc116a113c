# syntax=docker/dockerfile:1
#
# Images of drpo-gateway. Both run `drpo-gateway serve` by default; pass
# `optimizer` as the command for the sidecar.
#
#   docker build -t drpo-gateway .                           # needs DRPO_UPSTREAM
#   docker build --target gateway-cpu -t drpo-gateway:cpu .  # embedded llama-server
#
# The gateway-cpu target builds llama-server with scripts/install-engine.
# A Docker build reads the build host's /proc/cpuinfo, not the one of the
# host that runs the image, so the CPU features come from the build argument
# GGML_CPU_FEATURES instead. Its default, AVX2 with FMA and F16C, runs on
# x86-64 CPUs since 2013 (Haswell, Zen). Add AVX512, AVX512_VNNI or
# AVX512_BF16 only for hosts that have them.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS python-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY optimizer ./optimizer
RUN pip install --upgrade pip setuptools wheel \
    && pip install .

FROM python-build AS engine-build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
ARG GGML_CPU_FEATURES="AVX AVX2 FMA F16C"
COPY scripts/install-engine ./scripts/install-engine
# install-engine turns features on from /proc/cpuinfo and then appends
# DRPO_EXTRA_CMAKE_ARGS. CMake keeps the last -D of a variable, so these
# flags switch every feature that install-engine knows to exactly the
# requested set.
RUN extra="" \
    && for feature in AVX AVX2 FMA F16C AVX512 AVX512_VNNI AVX512_BF16; do \
         case " ${GGML_CPU_FEATURES} " in \
           *" ${feature} "*) extra="$extra -DGGML_${feature}=ON" ;; \
           *) extra="$extra -DGGML_${feature}=OFF" ;; \
         esac; \
       done \
    && DRPO_EXTRA_CMAKE_ARGS="$extra" XDG_CACHE_HOME=/tmp/engine-cache \
       scripts/install-engine /opt/venv \
    && rm -rf /tmp/engine-cache

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/drpo drpo \
    && mkdir /data \
    && chown drpo:drpo /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DRPO_HOST=0.0.0.0 \
    DRPO_PORT=8000 \
    DRPO_DATA_DIR=/data
VOLUME /data
WORKDIR /home/drpo
# 8000: the gateway's API and /metrics. 9464: the sidecar's metrics.
EXPOSE 8000 9464
# The sidecar serves no /health; compose and Kubernetes give it its own check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DRPO_PORT', '8000') + '/health', timeout=4)"]
ENTRYPOINT ["drpo-gateway"]
CMD ["serve"]

FROM runtime AS gateway-cpu
# llama-server links libgomp (OpenMP) and libstdc++ dynamically.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libstdc++6 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=engine-build /opt/venv /opt/venv
USER drpo

FROM runtime AS gateway
COPY --from=python-build /opt/venv /opt/venv
USER drpo

# syntax=docker/dockerfile:1
# The car classifier's CPU serving image: TorchServe 0.12.0 on Java 17, the handler and the default
# model's .mar, run as an unprivileged user. Every step but the project's own install goes through
# scripts/container.sh, which tests/test_container.py runs outside Docker (install, archive, start, predict).
#
# Layout: the build stage makes /opt/venv (the pinned requirements, then the project itself as a package:
# `pip install --no-deps .` of carmodel/, handler/, serving/ and client/, not editable, with their package
# data: handler's metrics.yaml, client's demo page) and the default model's .mar in /app/model_store. The
# runtime stage holds only that venv, that model store, config.properties (TorchServe's base configuration,
# which serve reads from the project's home, /app) and scripts/container.sh in /app: no source tree, no
# export, no training code.
#
#   docker build -t car-classifier .
#   docker run -d --name cars -p 127.0.0.1:8080:8080 -p 127.0.0.1:8081:8081 -p 127.0.0.1:8082:8082 car-classifier
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/photos:/data/in:ro" -v "$PWD/out:/data/out" \
#       car-classifier predict --csv
#
# Image size on paper (uncompressed, as `docker images` shows it), from the same packages measured on
# the project's machine where it could be done without Docker:
#   python:3.11-slim-bookworm                                                    ~125 MB
#   openjdk-17-jre-headless 184 MB + the libraries it adds (nss, glib, krb5,
#     fonts, cups, ...: apt Installed-Size)                                      ~210 MB
#   torch 2.13.0+cpu: 754 MB installed from its 192 MB wheel, less its C++ tests
#     and headers (dropped below)                                                ~575 MB
#   torchvision 0.28.0+cpu (estimate: PyPI's build is 24 MB, ~10 MB of it CUDA)  ~15 MB
#   the rest of requirements/serve.txt, installed: openvino 185, sympy+mpmath 80,
#     numpy 71, matplotlib+fonttools+kiwisolver+contourpy 73 (captum's), torchserve 47
#     (its Java frontend), pillow 22, huggingface-hub+hf-xet 19, timm 17, networkx 17,
#     ~35 smaller                                                                ~565 MB
#   the .mar (weights + int8 model) 17 MB, code < 1 MB                            ~18 MB
#   total                                                                       ~1.5 GB
# (PyPI's default torch is the CUDA build: torch 1.15 GB + nvidia-* 2.7 GB + triton 0.7 GB, an
# image of ~5.5 GB for nothing on a CPU.) Compressed in a registry: roughly 0.5 GB.

# ---------------------------------------------------------------- build: the venv (with the project) and the .mar
FROM python:3.11-slim-bookworm AS build
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHON=/opt/venv/bin/python
COPY requirements/ requirements/
COPY scripts/container.sh scripts/
# After installing, dropped: torch's C++ unit tests and headers (nothing is compiled at run time:
# the handler runs OpenVINO or eager torch).
RUN python -m venv /opt/venv \
    && scripts/container.sh install \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && rm -rf "$site/torch/test" "$site/torch/include" "$site"/torch/bin/test_*
# The project as a package, its dependencies being the ones above; training/ and bench/ stay out (setuptools
# finds only the packages present). Then pip goes: the image installs nothing at run time.
COPY pyproject.toml ./
COPY carmodel/ carmodel/
COPY handler/ handler/
COPY serving/ serving/
COPY client/ client/
RUN python -m pip install --no-cache-dir --no-deps --disable-pip-version-check . \
    && python -m pip uninstall --yes --quiet pip
COPY models/efficientnet_lite0_cars/ models/efficientnet_lite0_cars/
RUN MODEL_STORE=/app/model_store scripts/container.sh archive

# ---------------------------------------------------------------- runtime
FROM python:3.11-slim-bookworm
# Java 17 for TorchServe's frontend. Not pinned to a Debian revision: the base image tag is the pin,
# and a rebuild should pick up Debian's security updates (old revisions leave the mirror anyway).
# The man1 folder: the JRE's postinst links its man pages there, and the slim image has none.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-log-init --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /data/in /data/out \
    && chown 10001:10001 /data/out
# TorchServe's state (rendered config, logs, pid, unpacked archives) lives in /tmp, writable by any
# uid: `docker run --user "$(id -u):$(id -g)"` works too, so that results in /data/out are yours.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHON=/opt/venv/bin/python \
    PYTHONUNBUFFERED=1 \
    MODEL_STORE=/app/model_store \
    RUN_DIR=/tmp/torchserve
WORKDIR /app
# The venv holds the project (serve, predict-dir and their TorchServe configuration); /app, the model store
# and the entry point.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/model_store/ model_store/
COPY config.properties ./
COPY scripts/container.sh scripts/
USER 10001:10001
# Inference, management, metrics. They listen on 0.0.0.0 inside the container only (its own network
# namespace; the container profile, serving/torchserve.py): publish them on the host's loopback, not on
# every interface:
#   -p 127.0.0.1:8080:8080 -p 127.0.0.1:8081:8081 -p 127.0.0.1:8082:8082
EXPOSE 8080 8081 8082
# Images to classify (`predict`), and where the results go.
VOLUME ["/data/in", "/data/out"]
# TorchServe's /ping: 200 while the front end is up and no model is short of healthy workers (a model
# that cannot load never gets here: the start fails and the container exits). No curl in the slim image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; port = os.environ.get('INFERENCE_PORT') or '8080'; sys.exit(0 if u.urlopen(f'http://127.0.0.1:{port}/ping', timeout=3).status == 200 else 1)"]
ENTRYPOINT ["/app/scripts/container.sh"]
CMD ["start"]

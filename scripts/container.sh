#!/usr/bin/env bash
# The one script the Dockerfile runs, and the image's entry point. It does the same outside Docker
# (tests/test_container.py runs every subcommand against the project's virtualenv):
#
#   scripts/container.sh install    # pip: CPU-only torch/torchvision, then requirements/serve.txt
#                                   # (the project itself: the Dockerfile's `pip install --no-deps .`)
#   scripts/container.sh archive    # <root>/models/$MODEL's .mar into $MODEL_STORE (extra args: build-mar's)
#   scripts/container.sh start      # TorchServe in the foreground until SIGTERM/SIGINT (the image's CMD)
#   scripts/container.sh predict    # start, classify every image under $IN_DIR into $OUT_DIR, stop
#                                   # (extra args: predict-dir's, e.g. --csv --topk 3 --quiet)
#
# Environment (defaults in brackets):
#   PYTHON [python3]  PIP ["$PYTHON -m pip"]
#   TORCH_INDEX_URL [https://download.pytorch.org/whl/cpu]: where torch/torchvision come from;
#                   empty = the normal index (PyPI's CUDA build: ~3.5 GB more, unused on a CPU)
#   MODEL_STORE [<root>/model_store]  RUN_DIR [<root>/var/run]: rendered config, logs, pid
#   (<root>: the folder above scripts/, the checkout or the image's /app; also CAR_CLASSIFIER_HOME's default)
#   BIND_HOST [the profile's: 0.0.0.0 in the container profile]
#   INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT [8080, 8081, 8082]
#   IN_DIR [/data/in]  OUT_DIR [/data/out]  MODEL [efficientnet_lite0_cars]
#
# predict exits with predict-dir's status: 0 all classified, 1 some files failed,
# 2 no images (checked before TorchServe starts), 3 TorchServe unreachable or the key refused
# (also: it did not start), 4 TorchServe answered with an error (e.g. model not registered).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project's packages come from $PYTHON's environment (the image: `pip install .`; a checkout: make env's
# editable install), never from a source tree: -P keeps the working directory off sys.path.
export CAR_CLASSIFIER_HOME="${CAR_CLASSIFIER_HOME:-$ROOT}"

PYTHON="${PYTHON:-python3}"
PY=("$PYTHON" -P)
read -r -a PIP_CMD <<<"${PIP:-$PYTHON -m pip}"
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
MODEL="${MODEL:-efficientnet_lite0_cars}"
MODEL_STORE="${MODEL_STORE:-$ROOT/model_store}"
RUN_DIR="${RUN_DIR:-$ROOT/var/run}"

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 64
}

# serve's flags for this instance (profile, store, state, host, ports).
serve_flags() {
    SERVE=(--profile container --model_store "$MODEL_STORE" --run_dir "$RUN_DIR")
    if [[ -n "${BIND_HOST:-}" ]]; then SERVE+=(--host "$BIND_HOST"); fi
    if [[ -n "${INFERENCE_PORT:-}" ]]; then SERVE+=(--inference_port "$INFERENCE_PORT"); fi
    if [[ -n "${MANAGEMENT_PORT:-}" ]]; then SERVE+=(--management_port "$MANAGEMENT_PORT"); fi
    if [[ -n "${METRICS_PORT:-}" ]]; then SERVE+=(--metrics_port "$METRICS_PORT"); fi
}

do_install() {
    local index=() constraints
    if [[ -n "$TORCH_INDEX_URL" ]]; then index=(--index-url "$TORCH_INDEX_URL"); fi
    # torch/torchvision first, as a pair from one index, pins from requirements/torch.txt. --isolated:
    # a pip configuration (find-links, extra index) must not mix another build of either in.
    "${PIP_CMD[@]}" install --isolated --disable-pip-version-check "${index[@]}" -r "$ROOT/requirements/torch.txt"
    # Then the rest, with the torch just installed pinned exactly: nothing may swap in PyPI's CUDA build.
    constraints="$(mktemp)"
    "$PYTHON" -c 'import importlib.metadata as m; print("\n".join(f"{p}=={m.version(p)}" for p in ("torch", "torchvision")))' \
        >"$constraints"
    "${PIP_CMD[@]}" install --disable-pip-version-check -r "$ROOT/requirements/serve.txt" -c "$constraints"
    rm -f "$constraints"
    "$PYTHON" -c 'import torch, torchvision, ts, openvino; torchvision.ops.nms; print("torch", torch.__version__)'
    if [[ "$TORCH_INDEX_URL" == */cpu ]]; then
        "$PYTHON" -c 'import sys, torch; sys.exit(f"not a CPU-only torch: {torch.__version__}" if torch.version.cuda else 0)'
    fi
}

do_archive() {
    "${PY[@]}" -m serving.archive --export "$ROOT/models/$MODEL" --version 1.0 --model_store "$MODEL_STORE" --force "$@"
}

do_start() {
    serve_flags
    mkdir -p "$RUN_DIR"
    # serve appends TorchServe's output to torchserve.out: here, that is our stdout (docker logs; a
    # pipe there - outside Docker, redirect with >> so that both writers append).
    ln -sfn /proc/self/fd/1 "$RUN_DIR/torchserve.out"
    exec "${PY[@]}" -m serving.serve start "${SERVE[@]}" --fresh --foreground "$@"
}

do_predict() {
    local host="${BIND_HOST:-127.0.0.1}" in_dir="${IN_DIR:-/data/in}" child status=0
    if [[ "$host" == 0.0.0.0 ]]; then host=127.0.0.1; fi
    # A forgotten -v mount leaves /data/in empty: say so before starting TorchServe, not after.
    # shellcheck disable=SC2016 # the $PWD in the message is for the user's shell
    "${PY[@]}" -c '
import sys
from client.predict_dir import NoImagesError, find_images
try:
    find_images(sys.argv[1])
except NoImagesError as err:
    sys.exit(f"error: {err} (mount a folder of images: -v \"$PWD/photos:/data/in:ro\")")
' "$in_dir" || exit 2
    serve_flags
    mkdir -p "$RUN_DIR"
    if ! "${PY[@]}" -m serving.serve start "${SERVE[@]}" --fresh >&2; then
        tail -n 30 "$RUN_DIR/torchserve.out" >&2 || true
        exit 3
    fi
    trap '"${PY[@]}" -m serving.serve stop "${SERVE[@]}" >&2' EXIT
    "${PY[@]}" -m client.predict_dir "$in_dir" --model "$MODEL" --out "${OUT_DIR:-/data/out}" \
        --url "http://$host:${INFERENCE_PORT:-8080}" "$@" &
    child=$!
    # docker stop (SIGTERM to PID 1) or Ctrl-C: end the batch run, then the EXIT trap stops TorchServe.
    trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
    wait "$child" || status=$?
    if kill -0 "$child" 2>/dev/null; then wait "$child" || status=$?; fi # the first wait was cut short by a signal
    exit "$status"
}

command="${1:-}"
shift || true
case "$command" in
    install) do_install ;;
    archive) do_archive "$@" ;;
    start) do_start "$@" ;;
    predict) do_predict "$@" ;;
    *) usage ;;
esac

"""TorchServe's own gRPC API against the real server, with stubs generated at test time from the
.proto files inside the installed TorchServe (its front-end jar): what a gRPC client compiled from
TorchServe's protos sees."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import requests
from helpers import DEFAULT, extract_protos, png_declaring, worker_pids

MODEL = DEFAULT
PROTOS = ("proto/inference.proto", "proto/management.proto", "google/rpc/status.proto")
TIMEOUT = 60


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """inference_pb2 / inference_pb2_grpc / management_pb2 / management_pb2_grpc, compiled by grpcio-tools."""
    out = tmp_path_factory.mktemp("grpc_stubs")
    extract_protos(out)
    protoc = [sys.executable, "-m", "grpc_tools.protoc", f"-I{out / 'proto'}", f"-I{out}"]
    result = subprocess.run(
        [*protoc, f"--python_out={out}", f"--grpc_python_out={out}", *(str(out / p) for p in PROTOS)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(out))
        import inference_pb2
        import inference_pb2_grpc
        import management_pb2
        import management_pb2_grpc
        from google.protobuf import empty_pb2

        yield {
            "inference": inference_pb2,
            "inference_grpc": inference_pb2_grpc,
            "management": management_pb2,
            "management_grpc": management_pb2_grpc,
            "empty": empty_pb2,
        }


@pytest.fixture(scope="module")
def inference(server, stubs):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc_inference']}")
    yield stubs["inference_grpc"].InferenceAPIsServiceStub(channel)
    channel.close()


def request(stubs, body: bytes, model: str = MODEL, **fields: bytes):
    return stubs["inference"].PredictionsRequest(model_name=model, input={"data": body, **fields})


def test_ping(inference, stubs):
    health = json.loads(inference.Ping(stubs["empty"].Empty(), timeout=TIMEOUT).health)
    assert health["status"] == "Healthy"


def test_predictions_answer_as_http_does(server, inference, stubs, photo, car_images):
    answer = json.loads(inference.Predictions(request(stubs, photo), timeout=TIMEOUT).prediction)
    http = requests.put(server.url("inference") + f"/predictions/{MODEL}", data=photo, timeout=TIMEOUT).json()
    assert answer == http and len(answer) == 5


def test_the_detailed_answer_and_no_car_as_http_gives_them(server, inference, stubs, photo, no_car_pictures):
    """A `details` field asks for the detailed answer; a picture without a car answers []."""
    url = server.url("inference") + f"/predictions/{MODEL}"
    answer = json.loads(inference.Predictions(request(stubs, photo, details=b"true"), timeout=TIMEOUT).prediction)
    assert answer == requests.put(url, data=photo, headers={"X-Details": "true"}, timeout=TIMEOUT).json()
    assert answer["car"]["found"] is True and answer["predictions"]
    cat = no_car_pictures["skimage:cat"].read_bytes()
    assert json.loads(inference.Predictions(request(stubs, cat), timeout=TIMEOUT).prediction) == []


def test_a_bad_image_is_a_non_ok_status_naming_the_problem(server, inference, stubs, photo):
    """TorchServe 0.12's gRPC front end keeps only a batch's status: the handler fails a refused gRPC
    request that is alone in its batch (README, "gRPC"; batched with others it is OK with the JSON error)."""
    pids = worker_pids(server, MODEL)
    for body, status, says in [
        (b"not an image", grpc.StatusCode.INVALID_ARGUMENT, "supported format"),
        (b"\xff\xd8\xff\xe0 truncated jpeg", grpc.StatusCode.INVALID_ARGUMENT, "corrupt"),
        (png_declaring(100_000, 100_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "pixels"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            inference.Predictions(request(stubs, body), timeout=TIMEOUT)
        assert info.value.code() == status and says in info.value.details(), info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(inference.StreamPredictions(request(stubs, body), timeout=TIMEOUT))
        assert info.value.code() == status
    assert worker_pids(server, MODEL) == pids  # a failed batch is an answer, not a crash
    assert len(json.loads(inference.Predictions(request(stubs, photo), timeout=TIMEOUT).prediction)) == 5


def test_an_unknown_model_is_an_internal_error_naming_it(inference, stubs, photo):
    with pytest.raises(grpc.RpcError) as info:
        inference.Predictions(request(stubs, photo, "no_such_model"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INTERNAL  # TorchServe 0.12 (NOT_FOUND would be right): README says so
    assert "no_such_model" in info.value.details()


def test_stream_predictions_answers_once_and_the_worker_lives(server, inference, stubs, photo, car_images):
    """StreamPredictions used to kill the worker (GRPCJob reads the ts_stream_next response header,
    which a one-shot handler never set): the handler marks each answer as the stream's last part."""
    pids = worker_pids(server, MODEL)
    parts = list(inference.StreamPredictions(request(stubs, photo), timeout=TIMEOUT))
    assert len(parts) == 1 and len(json.loads(parts[0].prediction)) == 5
    assert worker_pids(server, MODEL) == pids
    answer = json.loads(inference.Predictions(request(stubs, photo), timeout=TIMEOUT).prediction)
    assert len(answer) == 5


def test_list_models_over_grpc_management_needs_a_limit(server, stubs):
    """proto3 sends an unset `limit` as 0, and TorchServe lists 0 models: README, "gRPC", says to pass one."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc_management']}")
    management = stubs["management_grpc"].ManagementAPIsServiceStub(channel)
    listed = json.loads(management.ListModels(stubs["management"].ListModelsRequest(limit=10), timeout=TIMEOUT).msg)
    unlimited = json.loads(management.ListModels(stubs["management"].ListModelsRequest(), timeout=TIMEOUT).msg)
    channel.close()
    assert MODEL in {m["modelName"] for m in listed["models"]}
    assert unlimited["models"] == []

"""api/openapi.yaml, the published description of the inference API: it validates
(openapi-spec-validator), and the real server's answers to every kind of request it documents are
among the statuses it lists, with bodies that match its schemas. TorchServe's own descriptions fail
validation; pinned, so that we notice if that changes."""

from __future__ import annotations

import base64
import re

import hypothesis
import pytest
import requests
import schemathesis
import yaml
from helpers import DEFAULT, ROOT, TIMEOUT, encode, png_declaring
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from PIL import Image
from schemathesis.specs.openapi.checks import positive_data_acceptance, unsupported_method

SPEC_PATH = ROOT / "api" / "openapi.yaml"
RESNET = "resnet50_cars"  # no box head: its box is null


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load(SPEC_PATH.read_text())


def test_the_document_validates(spec):
    validate(spec)


def operation(spec: dict, method: str, url: str) -> tuple[str, dict]:
    """The documented path template and operation that `url` (a path) and `method` call."""
    for template, item in spec["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, url) and method.lower() in item:
            return template, item[method.lower()]
    raise AssertionError(f"{method} {url} is not in {SPEC_PATH.name}")


def deref(spec: dict, node: dict) -> dict:
    """Follow a local $ref (#/components/...) to what it names."""
    while isinstance(node, dict) and "$ref" in node:
        target = spec
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def check_answer(spec: dict, method: str, response: requests.Response) -> None:
    """The status is documented for the operation called, and the JSON body matches its schema."""
    path = requests.utils.urlparse(response.url).path
    template, op = operation(spec, method, path)
    documented = op["responses"]
    assert str(response.status_code) in documented, f"{method} {template}: {response.status_code} undocumented"
    content = deref(spec, documented[str(response.status_code)]).get("content", {})
    assert response.headers.get("Content-Type", "").split(";")[0] in content, response.headers  # it says what it is
    schema = deref(spec, content["application/json"]["schema"])
    # the schema with the document's components beside it, so that its $refs resolve
    OAS30Validator({**schema, "components": spec["components"]}).validate(response.json())


def check_request_type(spec: dict, method: str, path: str, content_type: str) -> None:
    _, op = operation(spec, method, path)
    types = deref(spec, op["requestBody"])["content"]
    assert content_type in types or f"{content_type.split('/')[0]}/*" in types, content_type


def _jpeg_b64(photo: bytes) -> str:
    return base64.b64encode(photo).decode()


def requests_to_send(url: str, photo: bytes, no_car: bytes) -> list[tuple[str, str, dict, int]]:
    """(method, url, requests kwargs, expected status): each kind of request the document describes."""
    tiny = encode(Image.new("RGB", (8, 8)), "PNG")
    return [
        ("PUT", url, {"data": photo, "headers": {"Content-Type": "image/jpeg"}}, 200),
        ("PUT", url, {"data": photo, "headers": {"Content-Type": "image/jpeg", "X-Box": "true", "X-Top-K": "2"}}, 200),
        ("PUT", url, {"data": photo, "headers": {"Content-Type": "image/jpeg", "X-Details": "true"}}, 200),
        ("POST", url, {"json": {"image": _jpeg_b64(photo), "details": True, "topk": 1}}, 200),
        ("PUT", url, {"data": no_car, "headers": {"Content-Type": "image/jpeg"}}, 200),
        ("PUT", url, {"data": no_car, "headers": {"Content-Type": "image/jpeg", "X-Details": "true"}}, 200),
        ("POST", url, {"files": {"data": ("car.jpg", photo, "image/jpeg")}, "data": {"topk": "3"}}, 200),
        ("POST", url, {"json": {"image": _jpeg_b64(photo), "box": True}}, 200),
        ("POST", url, {"data": _jpeg_b64(photo), "headers": {"Content-Type": "text/plain"}}, 200),
        ("PUT", url + "/1.0", {"data": photo, "headers": {"Content-Type": "application/octet-stream"}}, 200),
        ("POST", url, {"json": {"picture": "x"}}, 400),
        ("PUT", url, {"data": photo, "headers": {"Content-Type": "image/jpeg", "X-Top-K": "0"}}, 400),
        ("PUT", url.rsplit("/", 1)[0] + "/no_such_model", {"data": photo}, 404),
        ("PUT", url, {"data": png_declaring(100_000, 100_000), "headers": {"Content-Type": "image/png"}}, 413),
        ("PUT", url, {"data": b"%PDF-1.4 not a car", "headers": {"Content-Type": "application/pdf"}}, 415),
        ("PUT", url, {"data": tiny, "headers": {"Content-Type": "image/png"}}, 422),
        ("PUT", url, {"data": photo[: len(photo) // 2], "headers": {"Content-Type": "image/jpeg"}}, 422),
        ("POST", url, {"data": photo, "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 500),
    ]


def test_the_server_answers_as_documented(server, spec, photo, no_car_pictures):
    url = f"{server.url('inference')}/predictions/{DEFAULT}"
    no_car = no_car_pictures["skimage:horse"].read_bytes()
    for method, target, kwargs, status in requests_to_send(url, photo, no_car):
        response = requests.request(method, target, timeout=TIMEOUT, **kwargs)
        assert response.status_code == status, (method, target, response.text[:300])
        check_answer(spec, method, response)
        sent = response.request.headers.get("Content-Type", "").split(";")[0]
        if status == 200:  # what was accepted is documented
            check_request_type(spec, method, requests.utils.urlparse(target).path, sent)


def test_boxes_and_explanations_as_documented(server, spec, photo):
    base = server.url("inference")
    null_box = requests.put(f"{base}/predictions/{RESNET}", data=photo, headers={"X-Box": "true"}, timeout=TIMEOUT)
    assert null_box.status_code == 200 and null_box.json()["box"] is None
    check_answer(spec, "PUT", null_box)
    explained = requests.post(f"{base}/explanations/{DEFAULT}", data=photo, timeout=TIMEOUT * 2)
    assert explained.status_code == 200, explained.text[:300]
    check_answer(spec, "POST", explained)
    check_answer(spec, "GET", requests.get(f"{base}/ping", timeout=TIMEOUT))


def test_torchserves_own_descriptions_fail_validation(server):
    """TorchServe 0.12's OPTIONS descriptions: invalid (duplicate operation ids, string defaults for
    integers), and the per-model one advertises /prediction/<model>, which is 404. Pinned; README says so."""
    inference, management = server.url("inference"), server.url("management")
    for url in (f"{inference}/", f"{management}/", f"{inference}/predictions/{DEFAULT}"):
        with pytest.raises(OpenAPIValidationError):
            validate(requests.options(url, timeout=TIMEOUT).json())
    per_model = requests.options(f"{inference}/predictions/{DEFAULT}", timeout=TIMEOUT).json()
    assert f"/prediction/{DEFAULT}" in per_model["paths"]
    assert requests.post(f"{inference}/prediction/{DEFAULT}", timeout=TIMEOUT).status_code == 404


# ---------------------------------------------------------------------------- schemathesis

SCHEMA = schemathesis.openapi.from_path(SPEC_PATH)
# A body that the document allows (any bytes) need not be an image: the server's 415 for random bytes is the
# documented answer, not a rejected valid request. An undeclared method (TRACE) is answered by TorchServe's
# front end as if it were the declared one, before the handler sees it: pinned by the next test.
EXCLUDED_CHECKS = [positive_data_acceptance, unsupported_method]


def fields_of(body) -> set[str]:
    """The multipart field names schemathesis will send ("" for a body that is not an object of fields)."""
    return set(body) if isinstance(body, dict) and body else {""}


@SCHEMA.parametrize()
@hypothesis.settings(
    max_examples=12, deadline=None, suppress_health_check=list(hypothesis.HealthCheck), database=None, derandomize=True
)
def test_schemathesis_finds_the_server_true_to_its_document(case, server):
    """Schemathesis's generated requests (bodies, headers, fields) at the served models: every answer's status,
    content type, headers and body are the document's. Model names and versions are the served ones, or every
    request would be a 404."""
    if "model_name" in (case.path_parameters or {}):
        case.path_parameters["model_name"] = DEFAULT
    if "model_version" in (case.path_parameters or {}):
        case.path_parameters["model_version"] = "1.0"
    # a multipart field without a name (schemathesis's negative cases make them) gets the front end's pinned 500
    hypothesis.assume(not (case.media_type == "multipart/form-data" and "" in fields_of(case.body)))
    case.call_and_validate(base_url=server.url("inference"), timeout=TIMEOUT, excluded_checks=EXCLUDED_CHECKS)


def test_what_the_java_front_end_does_that_the_handler_cannot_change(server, photo):
    """TorchServe 0.12's front end answers before the handler: pinned, so that we notice if it changes
    (docs/serving.md, "OpenAPI")."""
    url = f"{server.url('inference')}/predictions/{DEFAULT}"
    empty_name = requests.post(url, files={"": ("car.jpg", photo, "image/jpeg")}, timeout=TIMEOUT)
    assert empty_name.status_code == 500 and "empty name" in empty_name.text
    trace = requests.request("TRACE", f"{server.url('inference')}/ping", timeout=TIMEOUT)
    assert trace.status_code == 200

"""The Open Inference Protocol (KServe v2) as its own clients speak it, in place of TorchServe's
`kservev2` envelope, which KServe's TorchServe runtime turns on (TS_SERVICE_ENVELOPE) and which:

* keeps only the first element of a BYTES input (two photos in one input, one answer);
* cannot read the binary tensor extension (tritonclient's default `binary_data=True`: 503);
* answers a bad photo 200, its error inside a normal-looking `outputs`;
* answers BYTES outputs holding JSON objects, named after the inputs.

Here every element of every BYTES input is one encoded photo (base64 in JSON, raw bytes with the
binary extension), answered in order as typed tensors, one row per photo (the handler's detailed
answer, carmodel.predictor.Answer.details):

    car_found              BOOL   [N]     false: no car in the photo (its other rows are padding)
    car_score              FP32   [N]     the car/no-car score (models with a car head)
    make                   BYTES  [N]     the make; "" where the answer names none (no car, or not sure)
    make_probability       FP32   [N]     summed over the make's classes; 0 where no make is named
    body_type              BYTES  [N]     "" without a car
    body_type_probability  FP32   [N]
    uncertain              BOOL   [N]     a car, but not sure which
    class_ids              INT64  [N, k]  the top-k classes, best first; -1 without a car
    probabilities          FP32   [N, k]  calibrated; 0 without a car
    class_names            BYTES  [N, k]  "" without a car
    boxes                  FP32   [N, 4]  the car's box in the photo's pixels (models that localise); -1 without a car
    -- every car found (models with a detector), most prominent first, M = the most cars of any photo --
    car_count              INT64  [N]        how many cars were found (0: no car)
    car_boxes              FP32   [N, M, 4]  each car's box in the photo's pixels; -1 past car_count
    car_scores             FP32   [N, M]     each car's car score; 0 past car_count
    car_class_ids          INT64  [N, M]     each car's top-1 class; -1 past car_count
    car_probabilities      FP32   [N, M]     its calibrated probability; 0 past car_count
    car_class_names        BYTES  [N, M]     "" past car_count
    car_makes              BYTES  [N, M]     "" where the answer names no make, and past car_count
    car_uncertain          BOOL   [N, M]     false past car_count

`outputs` in the request picks among them; the request parameter `topk` sets k (default: the
handler's). A bad request or a bad photo fails the whole request with a 4xx and the protocol's
`{"error": "..."}`, naming the input and element.

`install()` (the handler module calls it on import) makes TorchServe build this envelope for
`service_envelope=kservev2`: ts/model_loader.py imports the handler first, then takes the first
class defined in ts.torch_handler.request_envelope.kservev2.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

from ts.torch_handler.request_envelope import kservev2

from carmodel.errors import StatusError

DATATYPES = {
    "car_found": "BOOL",
    "car_score": "FP32",
    "make": "BYTES",
    "make_probability": "FP32",
    "body_type": "BYTES",
    "body_type_probability": "FP32",
    "uncertain": "BOOL",
    "class_ids": "INT64",
    "probabilities": "FP32",
    "class_names": "BYTES",
    "boxes": "FP32",
    "car_count": "INT64",
    "car_boxes": "FP32",
    "car_scores": "FP32",
    "car_class_ids": "INT64",
    "car_probabilities": "FP32",
    "car_class_names": "BYTES",
    "car_makes": "BYTES",
    "car_uncertain": "BOOL",
}
NO_BOX = [-1, -1, -1, -1]
LACKS = {"car_score": "has no car head", "boxes": "does not localise the car"}  # the car_* outputs: a detector
CAR_OUTPUTS = {  # per car: how to read it off the car's answer, and what pads past the last car
    "car_boxes": (lambda car: car["box"], NO_BOX),
    "car_scores": (lambda car: car["score"], 0.0),
    "car_class_ids": (lambda car: car["predictions"][0]["class_id"], -1),
    "car_probabilities": (lambda car: car["predictions"][0]["probability"], 0.0),
    "car_class_names": (lambda car: car["predictions"][0]["class_name"], ""),
    "car_makes": (lambda car: car["make"]["name"] if car["make"] else "", ""),
    "car_uncertain": (lambda car: car["uncertain"], False),
}
OUTPUTS = tuple(DATATYPES)
PER_PREDICTION = ("class_ids", "probabilities", "class_names", "boxes")  # [N, k] or [N, 4]; the rest are [N]
BINARY_HEADER = "inference-header-content-length"  # the binary tensor extension's JSON length


class ProtocolError(StatusError, ValueError):
    """A v2 request that breaks the protocol (its shape, not an image in it)."""


@dataclass
class V2Request:
    """One v2 request: a handler row per photo, and what to answer."""

    id: str | None
    rows: list[dict] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # "input 'car' element 1", per row, for errors
    outputs: list[str] | None = None  # None: all of them


def split_binary(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the binary tail (`Inference-Header-Content-Length`), or the whole JSON."""
    try:
        size = int(header_length) if header_length is not None else len(body)
        return json.loads(body[:size]), body[size:]
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(400, f"request body is not a v2 inference request: {err}") from None


def binary_elements(blob: bytes, count: int, label: str) -> list[bytes]:
    """BYTES elements in the binary extension: each a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(blob):
            raise ProtocolError(400, f"{label}: binary data ends before its {count} elements")
        (size,) = struct.unpack_from("<I", blob, offset)
        elements.append(blob[offset + 4 : offset + 4 + size])
        offset += 4 + size
    if offset != len(blob):
        raise ProtocolError(400, f"{label}: binary_data_size does not match its {count} elements")
    return elements


def parse_request(body, header_length: str | None = None) -> V2Request:
    if isinstance(body, (bytes, bytearray)):
        body, blob = split_binary(bytes(body), header_length)
    else:
        blob = b""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise ProtocolError(400, "a v2 inference request needs a non-empty 'inputs' list")
    parameters = body.get("parameters") or {}
    request = V2Request(id=body.get("id"), outputs=requested_outputs(body.get("outputs")))
    options = {"details": True} | ({"topk": parameters["topk"]} if "topk" in parameters else {})
    for tensor in body["inputs"]:
        name = tensor.get("name") if isinstance(tensor, dict) else None
        label = f"input {name!r}"
        if not isinstance(name, str) or tensor.get("datatype") != "BYTES":
            raise ProtocolError(400, f"{label}: each input needs a name and datatype BYTES (an encoded photo each)")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(400, f"{label}: shape must be a list of sizes, got {shape!r}")
        count = math.prod(shape)
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            elements = [{"body": data} for data in binary_elements(blob[:size], count, label)]
            blob = blob[size:]
        else:
            data = tensor.get("data")
            if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
                raise ProtocolError(400, f"{label}: data must be a list of base64 strings")
            if len(data) != count:
                raise ProtocolError(400, f"{label}: shape {shape} holds {count} elements, data has {len(data)}")
            elements = [{"data": item} for item in data]
        for index, element in enumerate(elements):
            request.rows.append({**element, **options})
            request.labels.append(f"{label} element {index}")
    return request


def requested_outputs(outputs) -> list[str] | None:
    if outputs is None:
        return None
    names = [item.get("name") if isinstance(item, dict) else None for item in outputs]
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise ProtocolError(400, f"unknown output(s) {unknown}: this model answers {list(OUTPUTS)}")
    return names


def is_error(answer) -> bool:
    """The handler's answer for a photo it refused (InputError.to_json, or the load error)."""
    return isinstance(answer, dict) and "code" in answer and "message" in answer


def output_tensors(answers: list[dict], wanted: list[str] | None) -> list[dict]:
    """The handler's detailed answers as the v2 output tensors (module docstring): one row per photo."""
    k = max(len(answer["predictions"]) for answer in answers)

    def padded(answer: dict, key: str, empty) -> list:
        values = [p[key] for p in answer["predictions"]]
        return values + [empty] * (k - len(values))

    def named(share: dict | None) -> tuple[str, float]:
        return (share["name"], share["probability"]) if share else ("", 0.0)

    columns = {
        "car_found": [[a["car"]["found"]] for a in answers],
        "make": [[named(a["make"])[0]] for a in answers],
        "make_probability": [[named(a["make"])[1]] for a in answers],
        "body_type": [[named(a["body_type"])[0]] for a in answers],
        "body_type_probability": [[named(a["body_type"])[1]] for a in answers],
        "uncertain": [[a["uncertain"]] for a in answers],
        "class_ids": [padded(a, "class_id", -1) for a in answers],
        "probabilities": [padded(a, "probability", 0.0) for a in answers],
        "class_names": [padded(a, "class_name", "") for a in answers],
    }
    if all(a["car"]["score"] is not None for a in answers):
        columns["car_score"] = [[a["car"]["score"]] for a in answers]
    if all(a["car"]["box"] is not None or not a["car"]["found"] for a in answers):
        columns["boxes"] = [a["car"]["box"] or NO_BOX for a in answers]
    if all("cars" in a for a in answers):
        columns |= car_columns(answers)
    tensors = []
    for name in wanted or [name for name in OUTPUTS if name in columns]:
        if name not in columns:
            raise ProtocolError(400, f"output {name!r}: this model {LACKS.get(name, 'has no car detector')}")
        rows = columns[name]
        shape = [len(rows), len(rows[0])] if name in PER_PREDICTION or name in CAR_OUTPUTS else [len(rows)]
        values = [v for row in rows for v in row]
        if name == "car_boxes":
            shape, values = [*shape, 4], [v for box in values for v in box]
        tensors.append({"name": name, "datatype": DATATYPES[name], "shape": shape, "data": values})
    return tensors


def car_columns(answers: list[dict]) -> dict[str, list]:
    """Every car of every photo as [N, M] columns (car_boxes: [N, M] boxes), padded past each photo's last."""
    most = max(1, max(len(a["cars"]) for a in answers))
    columns = {"car_count": [[len(a["cars"])] for a in answers]}
    for name, (read, pad) in CAR_OUTPUTS.items():
        columns[name] = [[read(car) for car in a["cars"]] + [pad] * (most - len(a["cars"])) for a in answers]
    return columns


class CarsV2Envelope(kservev2.KServev2Envelope):
    def handle(self, data, context):
        self.context = context
        if context.get_request_header(0, "describe"):  # GET /models/<name>?customized=true
            return self._handle_fn(data, context)
        try:
            # one request per batch under an envelope (serving/kserve.py writes batchSize 1)
            request = parse_request(first_body(data[0]), self._header(BINARY_HEADER))
        except ProtocolError as err:
            return [self._error(err)]
        answers = self._handle_fn(request.rows, context)
        for label, answer in zip(request.labels, answers, strict=True):
            if is_error(answer):
                return [self._error(ProtocolError(answer["code"], f"{label}: {answer['message']}"))]
        try:
            outputs = output_tensors(answers, request.outputs)
        except ProtocolError as err:
            return [self._error(err)]
        manifest = context.manifest["model"]
        response_id = request.id or context.get_request_id(0)
        model = {"model_name": manifest["modelName"], "model_version": manifest.get("modelVersion")}
        return [{"id": response_id, **model, "outputs": outputs}]

    def _header(self, name: str) -> str | None:
        headers = self.context.get_all_request_header(0) or {}
        return next((value for key, value in headers.items() if key.lower() == name and isinstance(value, str)), None)

    def _error(self, err: ProtocolError) -> dict:
        self.context.set_response_status(err.status, err.message, 0)
        return {"error": err.message}


def first_body(row: dict):
    return row.get("data") if row.get("data") is not None else row.get("body")


def install() -> None:
    """Make TorchServe's `service_envelope=kservev2` build CarsV2Envelope (see the module docstring)."""
    if issubclass(kservev2.KServev2Envelope, CarsV2Envelope):
        return
    # TorchServe takes the first class whose __module__ is kservev2's own: ours, under its name.
    kservev2.KServev2Envelope = type("KServev2Envelope", (CarsV2Envelope,), {"__module__": kservev2.__name__})

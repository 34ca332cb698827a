"""What the tests share besides fixtures (those are in conftest.py): paths, the project's commands,
a tiny real training run, a TorchServe on free ports, image builders and the HTTP checks.

    from helpers import DEFAULT_EXPORT, post_raw, check_predictions
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import requests
import ts
from PIL import Image

from carmodel.vehicles import describe
from serving.torchserve import Server, free_ports

ROOT = Path(__file__).resolve().parent.parent
SHARED_CARS = (ROOT / ".." / "shared" / "stanford_cars").resolve()
DEFAULT = "efficientnet_lite0_cars"
DEFAULT_EXPORT = ROOT / "models" / DEFAULT
TIMEOUT = 60


# ---------------------------------------------------------------------------- commands


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kwargs)


def python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, *args], **kwargs)


def command(name: str) -> str:
    """One of the project's commands (pyproject's [project.scripts]), from this virtualenv."""
    return str(Path(sys.executable).parent / name)


def smoke_train(out: Path, cars_root: Path, arch: str, **overrides) -> Path:
    """A tiny but complete pipeline run: train -> evaluate -> export. Returns the export dir."""
    args = {
        "arch": arch,
        "data_root": str(cars_root),
        "max_images_per_class": 4,
        "val_fraction": 0.25,
        "test_fraction": 0.25,
        "epochs": 1,
        "train_size": 64,
        "eval_size": 64,
        "batch_size": 32,
        "progress": "false",
        "output_dir": str(out / "run"),
        "unfreeze": 1,
        **overrides,
    }
    flags = [x for k, v in args.items() for x in (f"--{k}", str(v))]
    result = python("-m", "training.train", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    export = out / "export"
    result = python("-m", "training.export", "--run", str(out / "run"), "--export_dir", str(export))
    assert result.returncode == 0, result.stderr[-3000:]
    return export


def start_server(run_dir: Path, store: Path, models: dict[str, str], **kwargs) -> Server:
    server = Server(run_dir=run_dir, model_store=store, ports=free_ports(), **kwargs)
    try:
        server.start(models, restore=False)
    except Exception:
        server.stop()
        raise
    return server


# ---------------------------------------------------------------------------- images


def extract_protos(out: Path) -> Path:
    """The .proto files inside the installed TorchServe's front-end jar (proto/inference.proto, ...), into `out`."""
    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as archive:
        archive.extractall(out, [name for name in archive.namelist() if name.endswith(".proto")])
    return out


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid 16x16 PNG whose IHDR then declares width x height (CRC fixed, so only the size lies):
    a decompression bomb's calling card."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (10, 20, 30)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_declaring(photo: bytes, width: int, height: int) -> bytes:
    """The photo with its frame header (SOF0/SOF2) rewritten to claim width x height."""
    data = bytearray(photo)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at > 0:
            data[at + 5 : at + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise ValueError("no SOF marker in the photo")


# ---------------------------------------------------------------------------- HTTP


def predict_url(server, model: str = DEFAULT) -> str:
    return f"{server.url('inference')}/predictions/{model}"


def post_raw(server, data: bytes, model: str = DEFAULT, **headers) -> requests.Response:
    headers = {"Content-Type": "application/octet-stream", **headers}
    return requests.post(predict_url(server, model), data=data, headers=headers, timeout=TIMEOUT)


def check_predictions(response: requests.Response, names: dict[str, str], k: int = 5) -> list[dict]:
    """A 200 JSON answer with k rows, best first, names from that model's archive, each with the make,
    model, year and body type of its class."""
    assert response.status_code == 200, response.text[:500]
    assert response.headers["Content-Type"] == "application/json"
    predictions = response.json()
    assert isinstance(predictions, list) and len(predictions) == k, predictions
    for p in predictions:
        assert set(p) == {"class_id", "class_name", "probability", "make", "model", "year", "body_type"}, p
        assert isinstance(p["class_id"], int) and 0 <= p["class_id"] < len(names)
        assert p["class_name"] == names[str(p["class_id"])]
        assert {k: p[k] for k in ("make", "model", "year", "body_type")} == describe(p["class_name"]).to_dict()
        assert isinstance(p["probability"], float) and 0.0 <= p["probability"] <= 1.0
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1.0 + 1e-4
    assert len({p["class_id"] for p in predictions}) == k
    return predictions


def check_error(response: requests.Response, status: int | None = None) -> dict:
    """A 4xx whose body is the handler's JSON error, with the same code as the HTTP status."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text[:500]
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["code"] == response.status_code
    assert isinstance(body["message"], str) and body["message"]
    return body


def management(server, path: str, method: str = "GET", **kwargs) -> requests.Response:
    return requests.request(method, f"{server.url('management')}{path}", timeout=TIMEOUT, **kwargs)


def worker_pids(server, model: str) -> list[int]:
    response = management(server, f"/models/{model}")
    assert response.status_code == 200, response.text
    pids = [w["pid"] for version in response.json() for w in version["workers"] if w["status"] == "READY"]
    assert pids, response.text
    return pids


def iou(a, b) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (torchvision's box_iou)."""
    import torch
    from torchvision.ops import box_iou

    return float(box_iou(torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32))[0, 0])

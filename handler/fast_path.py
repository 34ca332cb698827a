"""The CPU fast path: the same network compiled by OpenVINO, bf16 where the CPU has it.

Chosen by measurement on this project's 2-core AVX-512 machine (avx512_bf16, no AMX):
OpenVINO bf16 ran the shipped model about 5x faster than eager fp32 over the test split
(bench/parity.py, same top-1) and needs no compiler toolchain at load time, unlike torch.compile. The torch model stays
the reference: explanations (gradients) use it, and `backend: torch` serves with it.

Settings (model-config.yaml, `handler:` section):
    backend:   auto | openvino | torch    auto = openvino when it imports, else torch
    precision: auto | bf16 | fp32         auto = bf16 when the CPU reports BF16, else fp32
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "openvino", "torch")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Runner:
    """`run(batch) -> logits` plus what was chosen, for logs and tests."""

    run: Callable[[torch.Tensor], torch.Tensor]
    backend: str
    precision: str


def torch_runner(model: torch.nn.Module) -> Runner:
    device = next(model.parameters()).device

    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(inputs.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()

    return Runner(run, "torch", "fp32")


def openvino_runner(model: torch.nn.Module, image_size: int, precision: str = "auto") -> Runner:
    import openvino as ov

    core = ov.Core()
    if precision == "auto":
        precision = "bf16" if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "fp32"
    example = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad():
        ov_model = ov.convert_model(model.eval(), example_input=example)
    ov_model.reshape([-1, 3, image_size, image_size])  # any batch size TorchServe hands us
    compiled = core.compile_model(
        ov_model,
        "CPU",
        {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()  # one per worker process: TorchServe calls us serially

    def run(inputs: torch.Tensor) -> torch.Tensor:
        request.infer([inputs.contiguous().numpy()])
        return torch.from_numpy(request.get_output_tensor(0).data.copy()).float()

    return Runner(run, "openvino", precision)


def make_runner(model: torch.nn.Module, image_size: int, backend: str = "auto", precision: str = "auto") -> Runner:
    """The fastest available way to run `model` on this CPU, falling back to eager fp32."""
    if backend not in BACKENDS or precision not in PRECISIONS:
        raise ValueError(f"backend must be one of {BACKENDS} and precision one of {PRECISIONS}")
    if backend == "torch" or (precision == "fp32" and backend == "auto"):
        return torch_runner(model)
    try:
        runner = openvino_runner(model, image_size, precision)
    except ImportError:
        if backend == "openvino":
            raise
        logger.warning("openvino is not installed: serving with eager fp32 torch")
        return torch_runner(model)
    runner.run(torch.zeros(2, 3, image_size, image_size))  # compile kernels now, not on a user's request
    return runner

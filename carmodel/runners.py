"""Runners: `run(batch) -> the network's outputs` (a tuple: the logits, and the box of a model with
a box head), the fastest way this CPU allows, for one image size.

The same network compiled by OpenVINO: int8 where the export has a calibrated int8 model
(training.quantize; the server has no photos to calibrate on), else bf16 where the CPU has it,
else fp32 - chosen by measurement (docs/benchmarks.md, "int8"). OpenVINO needs no compiler
toolchain at load time, unlike torch.compile. The eager torch model stays the reference: the
fp32 runner, explanations (gradients) and `backend: torch` use it.

    backend:   auto | openvino | torch    auto = openvino when it imports, else torch
    precision: auto | int8 | bf16 | fp32  auto = int8 when there is an int8 model,
                                          else bf16 when the CPU reports BF16, else fp32
    threads:   0 | N                      0 = the library default (all cores)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "openvino", "torch")
PRECISIONS = ("auto", "int8", "bf16", "fp32")


def input_shape(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a runner's input: a square's side, or a (width, height) canvas."""
    return (image_size, image_size) if isinstance(image_size, int) else (image_size[1], image_size[0])


def to_openvino(model: torch.nn.Module, image_size: int | tuple[int, int]):
    """The torch network as an OpenVINO model taking any batch size."""
    import openvino as ov

    height, width = input_shape(image_size)
    with torch.no_grad():
        ov_model = ov.convert_model(model.eval(), example_input=torch.zeros(1, 3, height, width))
    ov_model.reshape([-1, 3, height, width])  # any batch size TorchServe hands us
    return ov_model


@dataclass(frozen=True)
class Runner:
    """`run(batch) -> outputs` plus what was chosen, for logs and tests."""

    run: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    backend: str
    precision: str


def torch_runner(model: torch.nn.Module, threads: int = 0) -> Runner:
    if threads:
        torch.set_num_threads(threads)
    device = next(model.parameters()).device

    def run(inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            outputs = model(inputs.to(device).contiguous(memory_format=torch.channels_last))
        return tuple(out.float().cpu() for out in (outputs if isinstance(outputs, tuple) else (outputs,)))

    return Runner(run, "torch", "fp32")


def openvino_runner(
    model: torch.nn.Module,
    image_size: int | tuple[int, int],
    precision: str = "auto",
    int8_model: Path | None = None,
    threads: int = 0,
) -> Runner:
    import openvino as ov

    core = ov.Core()
    has_int8 = int8_model is not None and Path(int8_model).is_file()
    if precision == "int8" and not has_int8:
        raise FileNotFoundError(f"precision int8 needs the calibrated model {int8_model} (python -m training.quantize)")
    if precision == "auto":
        bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        precision = "int8" if has_int8 else "bf16" if bf16 else "fp32"
    ov_model = core.read_model(int8_model) if precision == "int8" else to_openvino(model, image_size)
    # one network for both passes of a box-head model: the int8 file is stored at the eval size (or with
    # any size), so it is fixed here to this runner's size
    ov_model.reshape([-1, 3, *input_shape(image_size)])
    # int8: quantized layers run in int8 (VNNI); the few left in float stay fp32 for accuracy.
    properties = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(ov_model, "CPU", properties)
    request = compiled.create_infer_request()  # one per worker process: TorchServe calls us serially
    outputs = range(len(compiled.outputs))

    def run(inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        request.infer([inputs.contiguous().numpy()])
        return tuple(torch.from_numpy(request.get_output_tensor(i).data.copy()).float() for i in outputs)

    return Runner(run, "openvino", precision)


def make_runner(
    model: torch.nn.Module,
    image_size: int | tuple[int, int],
    backend: str = "auto",
    precision: str = "auto",
    int8_model: Path | None = None,
    threads: int = 0,
) -> Runner:
    """The fastest available way to run `model` on this CPU, falling back to eager fp32.
    `image_size`: a square's side, or a (width, height) canvas.
    `int8_model`: the calibrated int8 IR of this model, if there is one."""
    if backend not in BACKENDS or precision not in PRECISIONS:
        raise ValueError(f"backend must be one of {BACKENDS} and precision one of {PRECISIONS}")
    if backend == "torch" or (precision == "fp32" and backend == "auto"):
        return torch_runner(model, threads)
    try:
        runner = openvino_runner(model, image_size, precision, int8_model, threads)
    except ImportError:
        if backend == "openvino":
            raise
        logger.warning("openvino is not installed: serving with eager fp32 torch")
        return torch_runner(model, threads)
    runner.run(torch.zeros(2, 3, *input_shape(image_size)))  # compile kernels now, not on a user's request
    return runner

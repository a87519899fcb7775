"""Model level: the CPU deployment runtimes users would run a Perceiver with instead of PyTorch,
ONNX Runtime and OpenVINO, on the same model (the same seeded weights), inputs and thread count.

The float32 model is exported once per process with `torch.onnx.export` (the TorchScript exporter,
opset 17; the file in a temporary directory) and run by each runtime's CPU plugin. Inference only.
ONNX Runtime runs float32 (its CPU provider has no bfloat16 GEMMs). OpenVINO runs the file with
the row's dtype as its precision hint (f32 or bf16: how OpenVINO users ask for bfloat16), and the
row records the precision it ran (`precision`). Both are optional: `pip install onnxruntime openvino`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..profiler.models import NAMED_MODELS
from .cases import Case
from .model_providers import model_extras, model_inputs
from .providers import Provider, missing_module

# The runtime packages, by provider.
MODULES = {"ONNX Runtime": "onnxruntime", "OpenVINO": "openvino"}


class _Logits(torch.nn.Module):
    """The HF model as a function of (inputs[, attention_mask]) to its logits: what is exported."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs, attention_mask=None):
        return self.model(inputs=inputs, attention_mask=attention_mask).logits


def export_onnx(case: Case, dtype, device: str, directory: str) -> tuple[Path, dict]:
    """The case's float32 model as an ONNX file in `directory`, and its inputs by name (numpy arrays,
    the values the torch providers get: bfloat16 inputs widened to float32)."""
    model = NAMED_MODELS[case.name].build(case.M, torch.float32)
    inputs, mask = model_inputs(case, dtype, device, backward=False)
    inputs = inputs.float() if inputs.is_floating_point() else inputs
    arguments = (inputs,) if mask is None else (inputs, mask)
    names = ["inputs", "attention_mask"][:len(arguments)]
    path = Path(directory) / f"{case.name}.onnx"
    with torch.no_grad():
        torch.onnx.export(_Logits(model).eval(), arguments, str(path), input_names=names, output_names=["logits"],
                          opset_version=17, dynamo=False)
    return path, {name: a.numpy() for name, a in zip(names, arguments)}


def _refusal(name: str):
    def refusal(case: Case, dtype, device):
        if device != "cpu":
            return f"{name} is measured as a CPU deployment runtime"
        if case.name not in NAMED_MODELS:
            return f"no named model {case.name!r}"
        if name == "ONNX Runtime" and dtype != torch.float32:
            return "ONNX Runtime's CPU provider runs float32 (it has no bfloat16 GEMMs): see its float32 row"
        if dtype == torch.float16:
            return f"{name} is measured in float32 and bfloat16"
        return missing_module(MODULES[name]) or missing_module("onnx") or missing_module("transformers")
    return refusal


def _onnx_runtime(path: Path, dtype) -> tuple[object, dict]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0], {"precision": "f32"}


def _openvino(path: Path, dtype) -> tuple[object, dict]:
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32"})
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # "f32" or "bf16"
    return lambda feeds: compiled(feeds)[0], {"precision": precision}


def _provider(name: str, session) -> Provider:
    precisions = {}

    def prepare(case, dtype, device, backward):
        if backward:
            raise ValueError(f"{name} is an inference runtime: it has no training step")
        directory = tempfile.TemporaryDirectory(prefix="perceiver-fast-onnx-")
        path, feeds = export_onnx(case, dtype, device, directory.name)
        run, precisions[case] = session(path, dtype)

        def call():
            directory  # noqa: B018 - the file lives as long as the call
            return torch.from_numpy(run(feeds))
        return call

    base = model_extras(profiled=False)
    return Provider(name, "model", _refusal(name), prepare,
                    extras=lambda case, dtype, device, call, result: {**base(case, dtype, device, call, result),
                                                                      **precisions.get(case, {})})


def runtime_providers() -> list[Provider]:
    return [_provider("ONNX Runtime", _onnx_runtime), _provider("OpenVINO", _openvino)]

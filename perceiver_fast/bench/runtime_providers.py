"""Model level: the CPU deployment routes users would run a Perceiver with instead of PyTorch eager:
ONNX Runtime and OpenVINO running an ONNX file of the model, and an AOTInductor package of the
patched model, on the same model (the same seeded weights), inputs and thread count.

The float32 model is exported once per process with `torch.onnx.export`, the file in a temporary
directory: HF's own model by the TorchScript exporter (opset 17), the pf.patch'd one by the dynamo
exporter at opset 23, where the attention is the ONNX Attention operator (docs/deployment.md). Each
runtime's CPU plugin runs the file. Inference only. ONNX Runtime runs float32 (its CPU provider has
no bfloat16 GEMMs). OpenVINO runs the file with the row's dtype as its precision hint (f32 or bf16:
how OpenVINO users ask for bfloat16), and the row records the precision it ran (`precision`). Both
are optional: `pip install onnxruntime openvino` (and onnxscript for the dynamo exporter). The
AOTInductor row compiles the patched model's torch.export program into a package and loads it
(`torch._inductor.aoti_compile_and_package`), in the row's dtype.
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
PATCHED = " (pf.patch)"


class _Logits(torch.nn.Module):
    """The HF model as a function of (inputs[, attention_mask]) to its logits: what is exported."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs, attention_mask=None):
        return self.model(inputs=inputs, attention_mask=attention_mask).logits


def _model(case: Case, dtype, patched: bool) -> torch.nn.Module:
    model = NAMED_MODELS[case.name].build(case.M, dtype)
    if patched:
        import perceiver_fast as pf

        pf.patch(model)
    return _Logits(model).eval()


def export_onnx(case: Case, dtype, device: str, directory: str, patched: bool = False) -> tuple[Path, dict]:
    """The case's float32 model (pf.patch'd where `patched`) as an ONNX file in `directory`, and its inputs
    by name (numpy arrays, the values the torch providers get: bfloat16 inputs widened to float32)."""
    model = _model(case, torch.float32, patched)
    inputs, mask = model_inputs(case, dtype, device, backward=False)
    inputs = inputs.float() if inputs.is_floating_point() else inputs
    arguments = (inputs,) if mask is None else (inputs, mask)
    names = ["inputs", "attention_mask"][:len(arguments)]
    path = Path(directory) / f"{case.name}.onnx"
    with torch.no_grad():
        torch.onnx.export(model, arguments, str(path), input_names=names, output_names=["logits"],
                          opset_version=23 if patched else 17, dynamo=patched)
    return path, {name: a.numpy() for name, a in zip(names, arguments)}


def _refusal(name: str, patched: bool):
    def refusal(case: Case, dtype, device):
        if device != "cpu":
            return f"{name} is measured as a CPU deployment runtime"
        if case.name not in NAMED_MODELS:
            return f"no named model {case.name!r}"
        if name == "ONNX Runtime" and dtype != torch.float32:
            return "ONNX Runtime's CPU provider runs float32 (it has no bfloat16 GEMMs): see its float32 row"
        if dtype == torch.float16:
            return f"{name} is measured in float32 and bfloat16"
        exporter = missing_module("onnxscript") if patched else None
        return (missing_module(MODULES[name]) or missing_module("onnx") or exporter
                or missing_module("transformers"))
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


def _provider(name: str, session, patched: bool = False) -> Provider:
    precisions = {}

    def prepare(case, dtype, device, backward):
        if backward:
            raise ValueError(f"{name} is an inference runtime: it has no training step")
        directory = tempfile.TemporaryDirectory(prefix="perceiver-fast-onnx-")
        path, feeds = export_onnx(case, dtype, device, directory.name, patched)
        run, precisions[case] = session(path, dtype)

        def call():
            directory  # noqa: B018 - the file lives as long as the call
            return torch.from_numpy(run(feeds))
        return call

    base = model_extras(profiled=False)
    return Provider(name + (PATCHED if patched else ""), "model", _refusal(name, patched), prepare,
                    extras=lambda case, dtype, device, call, result: {**base(case, dtype, device, call, result),
                                                                      **precisions.get(case, {})})


def _aot_inductor_refusal(case: Case, dtype, device):
    if device != "cpu":
        return "AOTInductor is measured as a CPU deployment route"
    if case.name not in NAMED_MODELS:
        return f"no named model {case.name!r}"
    return missing_module("transformers")


def _aot_inductor() -> Provider:
    def prepare(case, dtype, device, backward):
        if backward:
            raise ValueError("an AOTInductor package is measured for inference: it has no training step")
        model = _model(case, dtype, patched=True)
        inputs, mask = model_inputs(case, dtype, device, backward=False)  # drawn after the model, as everywhere
        arguments = (inputs,) if mask is None else (inputs, mask)
        directory = tempfile.TemporaryDirectory(prefix="perceiver-fast-aoti-")
        with torch.no_grad():
            program = torch.export.export(model, arguments)
            package = torch._inductor.aoti_compile_and_package(program,
                                                               package_path=str(Path(directory.name) / "model.pt2"))
        run = torch._inductor.aoti_load_package(package)

        def call():
            directory  # noqa: B018 - the package lives as long as the call
            with torch.no_grad():
                return run(*arguments)
        return call

    return Provider("AOTInductor" + PATCHED, "model", _aot_inductor_refusal, prepare,
                    extras=model_extras(profiled=False))


def runtime_providers() -> list[Provider]:
    return [_provider("ONNX Runtime", _onnx_runtime), _provider("OpenVINO", _openvino),
            _provider("ONNX Runtime", _onnx_runtime, patched=True), _provider("OpenVINO", _openvino, patched=True),
            _aot_inductor()]

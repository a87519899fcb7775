"""Deploying pf.patch'd models (docs/deployment.md): torch.export with dynamic dims, AOTInductor
packages, and ONNX files from both of torch's exporters run in ONNX Runtime and OpenVINO. Each route's
output is compared with the unpatched model's in float64, on inputs of the example's sizes and of
other sizes where the route is dynamic."""

import copy
import functools
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from checks import MASKINGS, check_attention
from model_checks import relative_error

import perceiver_fast as pf
from perceiver_fast.dispatch import BackendUnsupportedError
from perceiver_fast.reference import input_attention_reference, linear_reference

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
openvino = pytest.importorskip("openvino")
pytest.importorskip("onnxscript")  # torch's dynamo ONNX exporter
hf = pytest.importorskip("transformers.models.perceiver.modeling_perceiver")
lucidrains = pytest.importorskip("perceiver_pytorch")
km = pytest.importorskip("perceiver.model.core.modules")
from perceiver.model.core.adapter import ClassificationOutputAdapter, InputAdapter, TrainableQueryProvider  # noqa: E402
from perceiver.model.core.config import CausalSequenceModelConfig  # noqa: E402
from transformers import PerceiverConfig  # noqa: E402

TOLERANCE = 1e-4  # the issue's: float32 logits within 1e-4 relative of eager
AR_PREFIX = 24


class Called(torch.nn.Module):
    """A model as a function of its two tensors (an input and its mask) to one output: what each route exports."""

    def __init__(self, model: torch.nn.Module, call: Callable):
        super().__init__()
        self.model, self.call = model, call

    def forward(self, first, second):
        return self.call(self.model, first, second)


class Features(InputAdapter):
    def forward(self, x):
        return x


def _keep(batch: int, length: int) -> torch.Tensor:
    """True = attend; item b > 0 loses its last b / (B + 1) of the keys."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b in range(1, batch):
        mask[b, length - length * b // (batch + 1):] = False
    return mask


def _hf_classifier():
    config = PerceiverConfig(num_latents=16, d_latents=64, image_size=8, num_labels=5, num_blocks=2,
                             num_self_attends_per_block=2, num_self_attention_heads=4, num_cross_attention_heads=1)
    return Called(hf.PerceiverForImageClassificationFourier(config),
                  lambda m, pixels, mask: m(inputs=pixels, attention_mask=mask).logits)


def _hf_mlm():
    config = PerceiverConfig(num_latents=16, d_latents=64, d_model=32, num_cross_attention_heads=1,
                             num_self_attention_heads=2, num_self_attends_per_block=2, max_position_embeddings=40,
                             vocab_size=50)
    return Called(hf.PerceiverForMaskedLM(config), lambda m, ids, mask: m(inputs=ids, attention_mask=mask).logits)


def _lucidrains_classifier():
    model = lucidrains.Perceiver(input_channels=3, input_axis=1, num_freq_bands=6, max_freq=10.0, depth=2,
                                 num_latents=16, latent_dim=48, cross_heads=1, cross_dim_head=64, latent_heads=4,
                                 latent_dim_head=12, num_classes=5, self_per_cross_attn=2)
    return Called(model, lambda m, data, mask: m(data, mask=mask))


def _lucidrains_lm():
    model = lucidrains.PerceiverLM(num_tokens=30, dim=24, depth=1, max_seq_len=40, num_latents=8, latent_dim=32,
                                   cross_heads=1, cross_dim_head=16, latent_heads=2, latent_dim_head=16)
    return Called(model, lambda m, tokens, mask: m(tokens, mask=mask))


def _krasserm_classifier():
    encoder = km.PerceiverEncoder(Features(20), num_latents=12, num_latent_channels=32, num_cross_attention_heads=2,
                                  num_cross_attention_qk_channels=16, num_cross_attention_v_channels=48,
                                  num_self_attention_heads=4, num_self_attention_layers_per_block=2)
    decoder = km.PerceiverDecoder(ClassificationOutputAdapter(5, 24), TrainableQueryProvider(1, 24),
                                  num_latent_channels=32, num_cross_attention_heads=3)
    return Called(km.PerceiverIO(encoder, decoder), lambda m, x, keep: m.decoder(m.encoder(x, pad_mask=~keep)))


def _krasserm_ar():
    config = CausalSequenceModelConfig(vocab_size=40, max_seq_len=48, max_latents=16, num_channels=32, num_heads=4,
                                       num_self_attention_layers=2, cross_attention_dropout=0.0)
    # Right padding: its pad mask covers keys the causal rule already hides from the last rows.
    return Called(km.CausalSequenceModel(config),
                  lambda m, tokens, keep: m(tokens, prefix_len=AR_PREFIX, pad_mask=~keep).logits)


def _tokens(vocab: int):
    return lambda batch, length: (torch.randint(0, vocab, (batch, length)), _keep(batch, length))


@dataclass(frozen=True)
class Deployable:
    """A small model of one library, its inputs of a (batch, length) and the sizes each route tries:
    the example's, and others that a dynamic export must also run."""

    build: Callable[[], Called]
    inputs: Callable[[int, int], tuple]
    length: int
    other_length: int | None  # None: the model fixes its input length


MODELS = {
    "hf-classifier": Deployable(_hf_classifier, lambda b, n: (torch.randn(b, 3, 8, 8), _keep(b, n).float()), 64, None),
    "hf-mlm": Deployable(_hf_mlm, lambda b, n: (torch.randint(0, 50, (b, n)), _keep(b, n).float()), 40, 29),
    # Its Fourier features fix the input length (it specialises under torch.export unpatched too).
    "lucidrains-classifier": Deployable(_lucidrains_classifier, lambda b, n: (torch.randn(b, n, 3), _keep(b, n)),
                                        50, None),
    "lucidrains-lm": Deployable(_lucidrains_lm, _tokens(30), 40, 33),
    "krasserm-classifier": Deployable(_krasserm_classifier, lambda b, n: (torch.randn(b, n, 20), _keep(b, n)),
                                      60, 45),
    "krasserm-ar": Deployable(_krasserm_ar, _tokens(40), 48, 40),
}
EXAMPLE_BATCH, OTHER_BATCH = 2, 3


@functools.cache
def _models(name: str) -> tuple[Called, Called]:
    """(unpatched float64, patched float32) copies of the same seeded model, in eval mode."""
    torch.manual_seed(sum(map(ord, name)))
    model = MODELS[name].build().eval()
    patched = Called(model.model, model.call).float()
    reference = Called(copy.deepcopy(model.model).double(), model.call)
    pf.patch(patched.model)
    return reference, patched


def _sizes(name: str) -> list[tuple[int, int]]:
    spec = MODELS[name]
    return [(EXAMPLE_BATCH, spec.length), (OTHER_BATCH, spec.other_length or spec.length)]


def _inputs(name: str, batch: int, length: int) -> tuple:
    torch.manual_seed(batch * 1000 + length)
    return MODELS[name].inputs(batch, length)


def _want(name: str, inputs: tuple) -> torch.Tensor:
    reference, _ = _models(name)
    with torch.no_grad():
        return reference(*(t.double() if t.is_floating_point() else t for t in inputs)).float()


def _check(name: str, run: Callable, sizes: list[tuple[int, int]]) -> None:
    for batch, length in sizes:
        inputs = _inputs(name, batch, length)
        got, want = run(*inputs), _want(name, inputs)
        assert got.shape == want.shape and got.dtype == torch.float32
        error = relative_error(got, want)
        assert error <= TOLERANCE, f"{name} at batch {batch}, length {length}: error {error:.2e}"


def _dynamic_shapes(name: str) -> tuple:
    batch = torch.export.Dim("batch", min=2, max=16)
    spec = MODELS[name]
    length = torch.export.Dim("length", min=spec.other_length, max=spec.length) if spec.other_length else None
    return tuple({0: batch, **({1: length} if length is not None else {})} for _ in range(2))


@functools.cache
def _exported(name: str) -> torch.export.ExportedProgram:
    _, patched = _models(name)
    with torch.no_grad():
        return torch.export.export(patched, _inputs(name, EXAMPLE_BATCH, MODELS[name].length),
                                   dynamic_shapes=_dynamic_shapes(name))


def _library_ops(graph: torch.fx.Graph) -> set[str]:
    return {str(node.target) for node in graph.nodes if str(node.target).startswith("perceiver_fast.")}


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_with_dynamic_sizes(name):
    program = _exported(name)
    # The exported program runs the library's kernels (the registered ops), not a copy of their math.
    assert {"perceiver_fast.input_attention.default", "perceiver_fast.attention.default"} & _library_ops(
        program.graph), _library_ops(program.graph)
    module = program.module()
    _check(name, module, _sizes(name))


@pytest.mark.parametrize("name", ["hf-mlm", "lucidrains-classifier", "krasserm-ar"])
def test_aot_inductor_package(name, tmp_path):
    path = torch._inductor.aoti_compile_and_package(_exported(name), package_path=str(tmp_path / "model.pt2"))
    _check(name, torch._inductor.aoti_load_package(path), _sizes(name))


def test_aot_inductor_package_needs_only_the_library(tmp_path):
    # The deployment process: it imports perceiver_fast (which registers the ops the package calls),
    # not the model's library, and never patches anything.
    path = torch._inductor.aoti_compile_and_package(_exported("hf-mlm"), package_path=str(tmp_path / "model.pt2"))
    inputs = _inputs("hf-mlm", OTHER_BATCH, MODELS["hf-mlm"].length)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        import perceiver_fast
        out = torch._inductor.aoti_load_package({str(path)!r})(*torch.load({str(tmp_path / 'inputs.pt')!r}))
        assert not [m for m in sys.modules if m.startswith(("transformers", "perceiver_pytorch"))]
        torch.save(out, {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    error = relative_error(torch.load(tmp_path / "out.pt"), _want("hf-mlm", inputs))
    assert error <= TOLERANCE


# (exporter, opset): torch's dynamo exporter at its default opset and at 23 (the Attention operator),
# the TorchScript one at 17.
EXPORTERS = {"dynamo": (True, None), "dynamo-opset23": (True, 23), "torchscript": (False, 17)}
INPUT_NAMES = ("first", "second")


@functools.cache
def _onnx_file(name: str, exporter: str, directory: str) -> str:
    _, patched = _models(name)
    dynamo, opset = EXPORTERS[exporter]
    path = os.path.join(directory, f"{name}-{exporter}.onnx")
    options = dict(dynamic_shapes=_dynamic_shapes(name)) if dynamo else dict(
        dynamic_axes={n: {0: "batch", **({1: "length"} if MODELS[name].other_length else {})} for n in INPUT_NAMES})
    with torch.no_grad():
        torch.onnx.export(patched, _inputs(name, EXAMPLE_BATCH, MODELS[name].length), path, dynamo=dynamo,
                          input_names=list(INPUT_NAMES), output_names=["out"],
                          **({} if opset is None else dict(opset_version=opset)), **options)
    return path


@pytest.fixture(scope="module")
def onnx_directory(tmp_path_factory):
    return str(tmp_path_factory.mktemp("onnx"))


def _onnx_runtime(path: str) -> Callable:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda *inputs: torch.from_numpy(session.run(None, dict(zip(INPUT_NAMES, (t.numpy() for t in inputs))))[0])


def _openvino(path: str) -> Callable:
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda *inputs: torch.from_numpy(compiled(dict(zip(INPUT_NAMES, (t.numpy() for t in inputs))))[0])


RUNTIMES = {"onnxruntime": _onnx_runtime, "openvino": _openvino}


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", MODELS)
def test_onnx_file_runs_in_each_runtime(name, exporter, runtime, onnx_directory):
    path = _onnx_file(name, exporter, onnx_directory)
    _check(name, RUNTIMES[runtime](path), _sizes(name))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_file_has_standard_operators_only(exporter, onnx_directory):
    graph = onnx.load(_onnx_file("hf-mlm", exporter, onnx_directory)).graph
    operators = {(node.domain or "ai.onnx", node.op_type) for node in graph.node}
    assert {domain for domain, _ in operators} == {"ai.onnx"}, operators
    names = {op for _, op in operators}
    # The fused input attention as LayerNorm, the projections and attention; opset 23's Attention
    # operator where the exporter has it.
    assert "LayerNormalization" in names
    assert ("Attention" in names) == (EXPORTERS[exporter][1] == 23)
    assert "Attention" in names or "Softmax" in names


def test_onnx_export_of_a_model_in_training_says_why():
    torch.manual_seed(0)
    config = PerceiverConfig(num_latents=8, d_latents=32, d_model=16, num_cross_attention_heads=1,
                             num_self_attention_heads=2, num_self_attends_per_block=1, max_position_embeddings=12,
                             vocab_size=20, attention_probs_dropout_prob=0.1)
    model = Called(hf.PerceiverForMaskedLM(config), lambda m, ids, mask: m(inputs=ids, attention_mask=mask).logits)
    pf.patch(model.model)
    with pytest.raises(Exception, match="torch.onnx.export.*eval mode.*dropout") as raised:
        torch.onnx.export(model.train(), (torch.randint(0, 20, (2, 12)), torch.ones(2, 12)), dynamo=True)
    assert isinstance(raised.value, BackendUnsupportedError) or isinstance(raised.value.__cause__,
                                                                           BackendUnsupportedError)


# The "onnx" backend (what every op is in an ONNX file) against the float64 reference, eagerly.
SHAPES = {"cross": (2, 3, 6, 11, 8, 12), "more-queries": (2, 2, 9, 4, 8, 8), "square": (1, 2, 7, 7, 16, 16)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
def test_onnx_backend_attention_contract(shape, key_mask, causal):
    def run(q, k, v, key_mask=None, causal=False):
        return pf.cross_attention(q, k, v, key_mask=key_mask, causal=causal, return_lse=True, backend="onnx")
    check_attention(run, shape, torch.float32, key_mask, causal)


@pytest.mark.parametrize("method", ["projection", "shortcut"])
def test_onnx_backend_input_attention_and_linear(method):
    batch, heads, queries, keys, channels, dim = 2, 2, 5, 13, 12, 6
    q = torch.randn(batch, heads, queries, dim, dtype=torch.float64)
    x = torch.randn(batch, keys, channels, dtype=torch.float64)
    weights = [torch.randn(heads * dim, channels, dtype=torch.float64) for _ in range(2)]
    biases = [torch.randn(heads * dim, dtype=torch.float64) for _ in range(2)]
    norm = (torch.randn(channels, dtype=torch.float64), torch.randn(channels, dtype=torch.float64))
    mask = _keep(batch, keys)
    got = pf.fused_input_attention(q, x, k_weight=weights[0], k_bias=biases[0], v_weight=weights[1], v_bias=biases[1],
                                   norm_weight=norm[0],
                                   norm_bias=norm[1], key_mask=mask, method=method, backend="onnx")
    want = input_attention_reference(q, x, k_weight=weights[0], k_bias=biases[0], v_weight=weights[1],
                                     v_bias=biases[1], norm_weight=norm[0], norm_bias=norm[1], key_mask=mask)
    assert relative_error(got, want) <= 1e-10
    residual = torch.randn(batch, keys, heads * dim, dtype=torch.float64)
    got = pf.linear(x, weights[0], biases[0], activation="gelu", residual=residual, backend="onnx")
    assert relative_error(got, linear_reference(x, weights[0], biases[0], activation="gelu", residual=residual)) <= 1e-12

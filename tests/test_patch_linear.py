"""pf.patch's linear layers (linear=True, the default): every nn.Linear inside a Perceiver runs pf.linear,
with the MLP's GELU, the residual adds and HF's embedding decoder fused; the parameter objects,
optimizers, state_dict, pickling and save_pretrained keep working, a changed weight is used at the
next call, and a patched model trains to the parameters the unpatched one reaches."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import perceiver_fast as pf
from model_checks import relative_error
from perceiver_fast.backends import cpu_linear
from perceiver_fast.patching import linear_layers
from perceiver_fast.patching.linear_layers import FastLinear, activation_name

hf = pytest.importorskip("transformers.models.perceiver.modeling_perceiver")
from transformers import PerceiverConfig  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402


@pytest.fixture(autouse=True)
def every_call_on_the_op(monkeypatch):
    """These small models' layers run the op, as a full-sized model's do (calls under
    SMALL_PROBLEM_MACS go to F.linear straight; test_small_calls_run_f_linear_straight checks that)."""
    monkeypatch.setattr(cpu_linear, "SMALL_PROBLEM_MACS", 0)


@pytest.fixture(params=["onednn", "torch"])
def gemm(request):
    """Both GEMM paths of the cpu backend's linear kernels, whatever the probe found here."""
    cpu_linear.force_gemm(request.param)
    yield request.param
    cpu_linear.force_gemm(None)


def test_small_calls_run_f_linear_straight(monkeypatch):
    monkeypatch.setattr(cpu_linear, "SMALL_PROBLEM_MACS", 2**25)
    model = language_model()
    pf.patch(model)
    monkeypatch.setattr(linear_layers, "linear", lambda *args, **kwargs: pytest.fail("pf.linear ran"))
    dense = model.perceiver.encoder.self_attends[0].mlp.dense1
    x = torch.randn(3, 48)
    assert relative_error(dense(x), torch.nn.functional.linear(x, dense.weight, dense.bias)) <= 1e-6
    reasons = pf.explain(pf.linear, x, dense.weight, dense.bias)["cpu"]
    assert reasons == [f"{3 * 48 * 48} multiply-adds, under {2**25}: the op's call overhead (about 0.1 ms) would "
                       f"exceed what its GEMM saves over torch's"]
    big = torch.randn(2**25 // (48 * 48) + 1, 48)
    assert pf.explain(pf.linear, big, dense.weight, dense.bias)["cpu"][0].startswith("runs ")


def language_model(**overrides):
    """hf-language shaped (MLM, qk 8 != v 12 channels per head, the embedding decoder), smaller."""
    config = PerceiverConfig(num_latents=16, d_latents=48, d_model=32, qk_channels=32, v_channels=48, num_blocks=1,
                             num_self_attends_per_block=2, num_self_attention_heads=4, num_cross_attention_heads=2,
                             vocab_size=50, max_position_embeddings=40, attention_probs_dropout_prob=0.0,
                             **overrides)
    torch.manual_seed(0)
    return hf.PerceiverForMaskedLM(config).eval()


def tokens(batch=2, length=40):
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    return model(inputs=ids).logits


def test_every_linear_layer_and_epilogue_is_patched(gemm):
    model = language_model()
    original = copy.deepcopy(model)
    report = pf.patch(model)
    linears = sum(isinstance(m, nn.Linear) for m in original.modules())
    assert report.replaced["Linear"] == linears and all(isinstance(m, FastLinear) for m in model.modules()
                                                          if isinstance(m, nn.Linear))
    assert report.replaced["PerceiverLayer"] == 4 and report.replaced["PerceiverEmbeddingDecoder"] == 1
    ids = tokens()
    with torch.no_grad():
        assert relative_error(logits(model, ids), logits(original, ids)) <= 1e-5


def test_linear_false_leaves_every_linear_layer():
    model = language_model()
    report = pf.patch(model, linear=False)
    assert set(report.replaced) == {"PerceiverSelfAttention", "PerceiverModel"}
    assert not any(isinstance(m, FastLinear) for m in model.modules())
    with pytest.raises(TypeError, match="linear must be a bool"):
        pf.patch(language_model(), linear="no")


def test_linear_layers_outside_a_perceiver_are_left():
    head = nn.Linear(50, 3)
    model = nn.Sequential(language_model(), head)
    pf.patch(model[0])
    pf.patch(model)
    assert type(head) is nn.Linear


def test_optimizer_made_before_patch_trains_to_the_unpatched_parameters(gemm):
    torch.manual_seed(0)
    unpatched = language_model().train()
    patched = copy.deepcopy(unpatched)
    # SGD: Adam's normalised step turns gradients of rounding noise (the key bias's, zero in exact arithmetic,
    # about 1e-8 in HF's float32) into full-sized steps, which would compare noise
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (unpatched, patched)]
    pf.patch(patched)
    ids = tokens()
    labels = tokens()
    for _ in range(3):
        for model, optimizer in zip((unpatched, patched), optimizers):
            optimizer.zero_grad()
            model(inputs=ids, labels=labels).loss.backward()
            optimizer.step()
    for (name, want), got in zip(unpatched.named_parameters(), patched.parameters()):
        # the key bias's gradient is zero in exact arithmetic: HF's rounding noise (1e-14) against the fused 0
        assert relative_error(got, want, floor=1e-6) <= 1e-4, name


def test_load_state_dict_and_in_place_changes_are_used_at_the_next_call(gemm):
    model, other = language_model(), language_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pf.patch(model)
    ids = tokens()
    with torch.no_grad():
        logits(model, ids)  # packs the weights
        model.load_state_dict(other.state_dict())
        assert relative_error(logits(model, ids), logits(other, ids)) <= 1e-5
        for p, q in zip(model.parameters(), other.parameters()):
            p.mul_(0.5)
            q.mul_(0.5)
        assert relative_error(logits(model, ids), logits(other, ids)) <= 1e-5


def test_pickle_deepcopy_save_pretrained_and_unpatch(tmp_path, gemm):
    model = language_model()
    pf.patch(model)
    ids = tokens()
    with torch.no_grad():
        want = logits(model, ids)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        model.save_pretrained(tmp_path)
        for restored in (torch.load(buffer, weights_only=False), copy.deepcopy(model),
                         hf.PerceiverForMaskedLM.from_pretrained(tmp_path).eval()):
            assert relative_error(logits(restored, ids), want) <= 1e-5
        classes = pf.unpatch(model)
        assert classes.replaced["Linear"] == sum(isinstance(m, nn.Linear) for m in model.modules())
        assert not any(isinstance(m, FastLinear) for m in model.modules())
        assert relative_error(logits(model, ids), want) <= 1e-5


def test_mlp_with_another_activation_runs_it_unfused():
    model = language_model(hidden_act="relu")
    original = copy.deepcopy(model)
    pf.patch(model)
    ids = tokens()
    with torch.no_grad():
        assert relative_error(logits(model, ids), logits(original, ids)) <= 1e-5


def test_hook_on_a_patched_linear_layer_runs():
    model = language_model()
    original = copy.deepcopy(model)
    pf.patch(model)
    for m in (model, original):
        m.perceiver.encoder.self_attends[0].mlp.dense1.register_forward_hook(lambda module, args, out: 2 * out)
    ids = tokens()
    with torch.no_grad():
        assert relative_error(logits(model, ids), logits(original, ids)) <= 1e-5


@pytest.mark.parametrize("module,name", [
    (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (torch.nn.functional.gelu, "gelu"),
    (ACT2FN["gelu"], "gelu"), (ACT2FN["gelu_new"], "gelu_tanh"), (ACT2FN["gelu_pytorch_tanh"], "gelu_tanh"),
    (ACT2FN["quick_gelu"], None), (nn.ReLU(), None),
])
def test_activations_fused_are_the_gelu_forms(module, name):
    assert activation_name(module) == name
    if name is not None:
        x = torch.randn(100, dtype=torch.float64) * 4
        got = pf.linear(x[:, None], torch.ones(1, 1, dtype=torch.float64), activation=name)[:, 0]
        assert relative_error(got, module(x)) <= 1e-6


def test_backend_reference_gives_higher_order_gradients():
    # patch(backend="reference") runs torch's own linear layers, which autograd differentiates twice
    model = language_model()
    pf.patch(model, backend="reference")
    params = [p for p in model.parameters() if p.requires_grad]
    loss = logits(model, tokens()).square().mean()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    penalty = sum(g.square().sum() for g in grads if g is not None)
    penalty.backward()
    assert model.perceiver.encoder.self_attends[0].mlp.dense1.weight.grad.abs().sum() > 0


def test_model_pinned_to_the_cpu_backend_keeps_float64_linear_layers_running():
    model = language_model().double()
    original = copy.deepcopy(model)
    pf.patch(model, backend="cpu")  # the cpu kernels run float64 attention, not float64 linear layers
    ids = tokens()
    with torch.no_grad():
        assert relative_error(logits(model, ids), logits(original, ids)) <= 1e-10


def test_model_backend_without_a_linear_op_runs_auto_linear_layers():
    model = language_model()
    pf.patch(model, backend="triton")  # its attention refuses CPU tensors outside the interpreter: linear only here
    dense = model.perceiver.encoder.self_attends[0].mlp.dense1
    x = torch.randn(3, 48)
    assert relative_error(dense(x), torch.nn.functional.linear(x, dense.weight, dense.bias)) <= 1e-5

"""pf.patch on lucidrains perceiver-pytorch models (the installed package, random weights)."""

import copy

import pytest
import torch
from torch.nn.utils import parametrize
from torch.utils.module_tracker import ModuleTracker

import perceiver_fast as pf
from model_checks import (Doubled, FallbackLog, LoraLinear, check_falls_back, check_patched_model,
                          check_wrapped_left_as_is, largest_tensor_in, linear_left_warning, relative_error,
                          replace_forward)

pytest.importorskip("perceiver_pytorch")
from perceiver_pytorch import Perceiver, PerceiverIO, PerceiverLM  # noqa: E402
from perceiver_pytorch.perceiver_pytorch import Attention, PreNorm  # noqa: E402


def keep_mask(shape) -> torch.Tensor:
    """lucidrains' bool mask, True = attend; item b > 0 loses its last b / (B + 1) of the keys."""
    mask = torch.ones(shape, dtype=torch.bool)
    flat = mask.view(shape[0], -1)
    for b in range(1, shape[0]):
        flat[b, flat.shape[1] - flat.shape[1] * b // (shape[0] + 1):] = False
    return mask


def image_perceiver(**overrides):
    """lucidrains-image shaped (one cross head of dim 64 over 2-D pixels with Fourier features), smaller."""
    kwargs = dict(input_channels=3, input_axis=2, num_freq_bands=6, max_freq=10.0, depth=2, num_latents=16,
                  latent_dim=48, cross_heads=1, cross_dim_head=64, latent_heads=4, latent_dim_head=12,
                  num_classes=5, self_per_cross_attn=2)
    return Perceiver(**{**kwargs, **overrides}).eval()


def run_perceiver(model, data, mask):
    return model(data, mask=mask)


def test_perceiver_matches_original_with_mask():
    report = check_patched_model(image_perceiver(), run_perceiver, torch.randn(3, 7, 9, 3), keep_mask((3, 7, 9)))
    assert report.replaced == {"PreNorm(Attention)": 6, "Linear": 31}


def test_perceiver_io_with_decoder_queries():
    model = PerceiverIO(dim=20, queries_dim=24, logits_dim=7, depth=2, num_latents=12, latent_dim=32, cross_heads=2,
                        cross_dim_head=16, latent_heads=4, latent_dim_head=8).eval()

    def run(m, data, mask, queries):
        return m(data, mask=mask, queries=queries)

    report = check_patched_model(model, run, torch.randn(2, 50, 20), keep_mask((2, 50)), torch.randn(2, 9, 24))
    assert report.replaced == {"PreNorm(Attention)": 4, "Linear": 19}


def test_perceiver_lm_with_padding():
    model = PerceiverLM(num_tokens=30, dim=24, depth=1, max_seq_len=40, num_latents=8, latent_dim=32,
                        cross_heads=1, cross_dim_head=16, latent_heads=2, latent_dim_head=16).eval()

    def run(m, tokens, mask):
        return m(tokens, mask=mask)

    check_patched_model(model, run, torch.randint(0, 30, (2, 40)), keep_mask((2, 40)))


def test_bare_attention_module():
    attention = Attention(query_dim=24, context_dim=10, heads=3, dim_head=8).eval()

    def run(m, x, context, mask):
        return m(x, context=context, mask=mask)

    report = check_patched_model(attention, run, torch.randn(2, 5, 24), torch.randn(2, 33, 10), keep_mask((2, 33)))
    assert report.replaced == {"Attention": 1, "Linear": 3}


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training-with-dropout"])
def test_patched_step_forms_no_score_sized_tensor(training):
    # inference: a forward; training: forward and backward with attention dropout, whose mask is never stored
    latents, side = 512, 40
    model = image_perceiver(num_latents=latents, depth=1, self_per_cross_attn=1,
                            attn_dropout=0.1 if training else 0.0).train(training)
    data, mask = torch.randn(1, side, side, 3, requires_grad=training), keep_mask((1, side, side))

    def step():
        out = run_perceiver(model, data, mask)
        if training:
            out.square().sum().backward()

    score_bytes = latents * side * side * 4
    assert largest_tensor_in(step)[0] >= score_bytes
    pf.patch(model)
    with FallbackLog() as fallbacks:
        patched, op = largest_tensor_in(step)
    assert not fallbacks.reasons
    assert patched < score_bytes, f"{op} produced {patched} bytes"


def test_training_with_attention_dropout_runs_fused():
    model = image_perceiver(attn_dropout=0.2).train()
    check_patched_model(model, run_perceiver, torch.randn(2, 7, 9, 3), keep_mask((2, 7, 9)))


def test_inverted_attention_falls_back():
    model = image_perceiver(inverted_cross_attn=True)
    reasons = check_falls_back(model, run_perceiver, torch.randn(2, 7, 9, 3), keep_mask((2, 7, 9)))
    assert "inverted" in reasons[0]


CROSS_ATTENTION = "layers.0.cross_attn"


def tripled(output):
    return 3 * output


@pytest.mark.parametrize("path,wrap,reason,linear_left", [
    # accelerate's hooks, PEFT-style wrappers and monkeypatches set forward on the instance (the linear
    # layer whose forward is replaced is left unswapped too: it would never run)
    ("fn.to_kv", lambda to_kv: replace_forward(to_kv, tripled), "fn.to_kv has its forward replaced on the instance",
     True),
    ("fn", lambda attention: replace_forward(attention, tripled), "fn has its forward replaced on the instance", False),
    ("fn.to_kv", lambda to_kv: parametrize.register_parametrization(to_kv, "weight", Doubled()),
     "fn.to_kv has parametrized weights", False),
], ids=["to_kv-forward", "attention-forward", "to_kv-parametrization"])
def test_wrapped_submodule_leaves_cross_attention_as_is(path, wrap, reason, linear_left, caplog):
    # the fused PreNorm does the Attention's forward itself and reads to_kv's weight instead of calling it
    check_wrapped_left_as_is(image_perceiver(), run_perceiver, torch.randn(2, 7, 9, 3), keep_mask((2, 7, 9)),
                             unit=CROSS_ATTENTION,
                             wrap=lambda model: wrap(model.get_submodule(f"{CROSS_ATTENTION}.{path}")),
                             warning=f"patch leaves {CROSS_ATTENTION} (PreNorm(Attention)) as it is: {reason}",
                             caplog=caplog, linear_left=linear_left_warning(f"{CROSS_ATTENTION}.{path}", linear_left))


def test_lora_projection_leaves_bare_attention_as_is(caplog):
    # PEFT's LoRA layer shows the base layer's weight as its own: read directly, the update would be lost.
    # Everything patch knows is left as it is: it reports that rather than raising.
    def run(m, x, context, mask):
        return m(x, context=context, mask=mask)

    check_wrapped_left_as_is(Attention(query_dim=24, context_dim=10, heads=3, dim_head=8).eval(), run,
                             torch.randn(2, 5, 24), torch.randn(2, 33, 10), keep_mask((2, 33)), unit="",
                             wrap=lambda attention: attention.set_submodule("to_kv", LoraLinear(attention.to_kv)),
                             warning="patch leaves Attention as it is: to_kv is a model_checks.LoraLinear, not a "
                                     "torch.nn.modules.linear.Linear", caplog=caplog)


def test_forward_replaced_after_patching_falls_back():
    model = image_perceiver()
    fast = copy.deepcopy(model)
    pf.patch(fast)
    for m in (model, fast):
        replace_forward(m.get_submodule(f"{CROSS_ATTENTION}.fn.to_kv"), tripled)
    data, mask = torch.randn(2, 7, 9, 3), keep_mask((2, 7, 9))
    with FallbackLog() as fallbacks:
        got = run_perceiver(fast, data, mask)
    assert fallbacks.reasons == ["patched PreNorm keeps the original computation: fn.to_kv has its forward replaced "
                                 "on the instance"]
    assert relative_error(got, run_perceiver(model, data, mask)) <= 1e-5


def test_global_hooks_keep_the_model_fused():
    # process-wide observers (ModuleTracker, FlopCounterMode's) must not make the model they measure run unfused
    model = image_perceiver()
    pf.patch(model)
    with ModuleTracker(), FallbackLog() as fallbacks:
        run_perceiver(model, torch.randn(2, 7, 9, 3), keep_mask((2, 7, 9)))
    assert not fallbacks.reasons


def test_state_dict_is_unchanged_and_unpatch_restores():
    model = image_perceiver()
    keys = list(model.state_dict())
    pf.patch(model)
    assert list(model.state_dict()) == keys
    patched = type(model.layers[0].cross_attn)
    assert patched is not PreNorm and issubclass(patched, PreNorm) and patched.__name__ == "PreNorm"
    assert pf.unpatch(model).replaced == {"PreNorm(Attention)": 6, "Linear": 31}
    assert type(model.layers[0].cross_attn) is PreNorm

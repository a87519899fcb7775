"""pf.patch on krasserm perceiver-io models (perceiver.model.core, the installed package, random weights)."""

import copy

import pytest
import torch
from torch.nn.utils import parametrize

import perceiver_fast as pf
from model_checks import (Doubled, FallbackLog, check_falls_back, check_patched_model, check_wrapped_left_as_is,
                          largest_tensor_in, linear_left_warning, relative_error, replace_forward)

core = pytest.importorskip("perceiver.model.core")
from perceiver.model.core import modules as km  # noqa: E402
from perceiver.model.core.adapter import ClassificationOutputAdapter, InputAdapter, TrainableQueryProvider  # noqa: E402
from perceiver.model.core.config import CausalSequenceModelConfig  # noqa: E402


class Features(InputAdapter):
    """The smallest input adapter: the input is already (B, M, C) features."""

    def forward(self, x):
        return x


def pad_mask(batch: int, length: int, left: bool = False) -> torch.Tensor:
    """krasserm's bool pad mask, True = padding; item b > 0 has b / (B + 2) of its positions padded."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(1, batch):
        padded = length * b // (batch + 2)
        mask[b, :padded] = True if left else False
        if not left:
            mask[b, length - padded:] = True
    return mask


def perceiver_io(channels=20, latents=12, **encoder_overrides):
    """Encoder with two cross-attention layers (qk and v channels differ) and a classification decoder."""
    kwargs = dict(num_latents=latents, num_latent_channels=32, num_cross_attention_heads=2,
                  num_cross_attention_qk_channels=16, num_cross_attention_v_channels=48, num_cross_attention_layers=2,
                  num_self_attention_heads=4, num_self_attention_layers_per_block=2, num_self_attention_blocks=2)
    encoder = km.PerceiverEncoder(Features(channels), **{**kwargs, **encoder_overrides})
    decoder = km.PerceiverDecoder(ClassificationOutputAdapter(5, 24), TrainableQueryProvider(1, 24),
                                  num_latent_channels=32, num_cross_attention_heads=3)
    return km.PerceiverIO(encoder, decoder).eval()


def run_io(model, x, mask):
    return model.decoder(model.encoder(x, pad_mask=mask))


def causal_model(**overrides):
    """krasserm-clm shaped Perceiver AR (causal cross-attention, rotary embeddings), smaller."""
    config = CausalSequenceModelConfig(vocab_size=40, max_seq_len=48, max_latents=16, num_channels=32, num_heads=4,
                                       num_self_attention_layers=2, cross_attention_dropout=0.0, **overrides)
    return km.CausalSequenceModel(config).eval()


def test_perceiver_io_matches_original_with_padding():
    report = check_patched_model(perceiver_io(), run_io, torch.randn(3, 60, 20), pad_mask(3, 60))
    # two encoder cross-attention layers and the decoder's; two self-attention layers shared by both blocks
    assert report.replaced == {"CrossAttention": 3, "SelfAttention": 2, "Linear": 31, "MLP": 5}


def test_perceiver_ar_causal_rotary_left_padding():
    model = causal_model()

    def run(m, tokens, mask):
        return m(tokens, prefix_len=32, pad_mask=mask).logits

    check_patched_model(model, run, torch.randint(0, 40, (3, 48)), pad_mask(3, 48, left=True))


def test_perceiver_ar_kv_cache_step():
    model = causal_model()

    def run(m, tokens, mask):
        first = m(tokens[:, :-1], prefix_len=24, pad_mask=mask[:, :-1], kv_cache=[])
        second = m(tokens[:, -1:], prefix_len=24, pad_mask=mask, kv_cache=first.kv_cache)
        return first.logits, second.logits, second.kv_cache

    check_patched_model(model, run, torch.randint(0, 40, (2, 41)), pad_mask(2, 41, left=True))


def test_perceiver_ar_under_autocast():
    # rotary embeddings turn q and k float32 while v is bfloat16: the patched model must cope as the einsum does
    model = causal_model()
    fast = copy.deepcopy(model)
    pf.patch(fast)
    tokens, mask = torch.randint(0, 40, (2, 48)), pad_mask(2, 48, left=True)
    exact = copy.deepcopy(model).double()(tokens, prefix_len=32, pad_mask=mask).logits
    with torch.autocast("cpu", dtype=torch.bfloat16), FallbackLog() as fallbacks:
        want = model(tokens, prefix_len=32, pad_mask=mask).logits
        got = fast(tokens, prefix_len=32, pad_mask=mask).logits
    assert got.dtype == want.dtype and not fallbacks.reasons
    assert relative_error(got, exact) <= 2 * relative_error(want, exact) + 1e-3


def test_bare_multi_head_attention():
    attention = km.MultiHeadAttention(num_heads=2, num_q_input_channels=24, num_kv_input_channels=10,
                                      num_qk_channels=16, num_v_channels=40, causal_attention=True).eval()

    def run(m, x_q, x_kv, mask):
        return m(x_q, x_kv, pad_mask=mask).last_hidden_state

    report = check_patched_model(attention, run, torch.randn(2, 9, 24), torch.randn(2, 30, 10),
                                 pad_mask(2, 30, left=True))
    assert report.replaced == {"MultiHeadAttention": 1, "Linear": 4}


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training-with-dropout"])
def test_patched_step_forms_no_score_sized_tensor(training):
    # inference: a forward; training: forward and backward with attention dropout, whose mask is never stored
    latents, keys = 320, 2000
    model = perceiver_io(channels=16, latents=latents, num_cross_attention_layers=1, num_self_attention_blocks=1,
                         dropout=0.1 if training else 0.0).train(training)
    x, mask = torch.randn(1, keys, 16, requires_grad=training), pad_mask(1, keys)

    def step():
        out = run_io(model, x, mask)
        if training:
            out.square().sum().backward()

    score_bytes = latents * keys * 4
    assert largest_tensor_in(step)[0] >= 2 * score_bytes  # 2 heads
    pf.patch(model)
    with FallbackLog() as fallbacks:
        patched, op = largest_tensor_in(step)
    assert not fallbacks.reasons
    assert patched < score_bytes, f"{op} produced {patched} bytes"


def test_training_with_attention_dropout_runs_fused():
    check_patched_model(perceiver_io(dropout=0.25).train(), run_io, torch.randn(2, 60, 20), pad_mask(2, 60))


def test_perceiver_ar_training_with_attention_dropout_runs_fused():
    model = causal_model(post_attention_dropout=0.2).train()

    def run(m, tokens, mask):
        return m(tokens, prefix_len=32, pad_mask=mask).logits

    check_patched_model(model, run, torch.randint(0, 40, (3, 48)), pad_mask(3, 48, left=True))


def test_item_without_keys_falls_back():
    mask = pad_mask(2, 60)
    mask[1] = True
    check_falls_back(perceiver_io(), run_io, torch.randn(2, 60, 20), mask)


ENCODER_CROSS_ATTENTION = "0.cross_attn_1.0.module"


def tripled(output):
    return 3 * output


@pytest.mark.parametrize("path,wrap,reason,linear_left", [
    # accelerate's hooks, PEFT-style wrappers and monkeypatches set forward on the instance (the linear
    # layer whose forward is replaced is left unswapped too: it would never run)
    ("attention.k_proj", lambda k_proj: replace_forward(k_proj, lambda k: 30 * k),
     "attention.k_proj has its forward replaced on the instance", True),
    ("attention", lambda attention: replace_forward(attention, tripled),
     "attention has its forward replaced on the instance", False),
    ("kv_norm", lambda kv_norm: replace_forward(kv_norm, tripled), "kv_norm has its forward replaced on the instance",
     False),
    ("attention.v_proj", lambda v_proj: parametrize.register_parametrization(v_proj, "weight", Doubled()),
     "attention.v_proj has parametrized weights", False),
], ids=["k_proj-forward", "attention-forward", "kv_norm-forward", "v_proj-parametrization"])
def test_wrapped_submodule_leaves_cross_attention_as_is(path, wrap, reason, linear_left, caplog):
    # the fused CrossAttention does the MultiHeadAttention's forward itself, applies kv_norm and
    # projects K and V inside the fused op from the weights
    check_wrapped_left_as_is(perceiver_io(), run_io, torch.randn(2, 60, 20), pad_mask(2, 60),
                             unit=ENCODER_CROSS_ATTENTION,
                             wrap=lambda model: wrap(model.get_submodule(f"{ENCODER_CROSS_ATTENTION}.{path}")),
                             warning=f"patch leaves {ENCODER_CROSS_ATTENTION} (CrossAttention) as it is: {reason}",
                             caplog=caplog,
                             linear_left=linear_left_warning(f"{ENCODER_CROSS_ATTENTION}.{path}", linear_left))


def test_state_dict_is_unchanged_and_unpatch_restores():
    model = causal_model()
    checkpoint = copy.deepcopy(model.state_dict())
    pf.patch(model)
    assert list(model.state_dict()) == list(checkpoint)
    model.load_state_dict(checkpoint)
    patched = type(model.cross_attention[0].module)
    assert patched is not km.CrossAttention and patched.__name__ == "CrossAttention"
    assert pf.unpatch(model).replaced == {"CrossAttention": 1, "SelfAttention": 2, "Linear": 18, "MLP": 3,
                                          "FrequencyPositionEncoding": 1}
    assert type(model.cross_attention[0].module) is km.CrossAttention

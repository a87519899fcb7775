"""pf.patch on HF transformers Perceiver models (the installed package, random weights)."""

import copy
import re

import pytest
import torch
from torch.nn.utils import parametrize

import perceiver_fast as pf
from model_checks import (Doubled, FallbackLog, check_falls_back, check_patched_model, check_wrapped_left_as_is,
                          largest_tensor_in, linear_left_warning, relative_error, replace_forward)

hf = pytest.importorskip("transformers.models.perceiver.modeling_perceiver")
from transformers import PerceiverConfig  # noqa: E402


def padding_mask(batch: int, keys: int, dtype=torch.float32) -> torch.Tensor:
    """HF's (B, M) attention_mask, 1 = attend, with a different amount of padding per item."""
    mask = torch.ones(batch, keys, dtype=dtype)
    for b in range(1, batch):
        mask[b, keys - keys * b // (batch + 1):] = 0
    return mask


def vision_fourier(num_latents=24, d_latents=64, image_size=9, **overrides):
    """hf-vision-fourier shaped (C = 261 input channels, one cross-attention head of dim 261), smaller."""
    config = PerceiverConfig(num_latents=num_latents, d_latents=d_latents, image_size=image_size, num_labels=5,
                             num_blocks=2, num_self_attends_per_block=2, num_self_attention_heads=4,
                             num_cross_attention_heads=1, **overrides)
    return hf.PerceiverForImageClassificationFourier(config).eval()


def run_classifier(model, pixels, mask, **kwargs):
    return model(inputs=pixels, attention_mask=mask, **kwargs).logits


def test_vision_fourier_matches_original_with_padding():
    model = vision_fourier()
    pixels = torch.randn(3, 3, 9, 9)
    report = check_patched_model(model, run_classifier, pixels, padding_mask(3, 81))
    # the encoder's cross-attention, 2 self-attends (shared across blocks), the decoder; the model's mask
    # and every linear layer, the MLPs' GELU and residual add and the query residual fused into them
    assert report.replaced == {"PerceiverSelfAttention": 4, "PerceiverModel": 1, "Linear": 25, "PerceiverAttention": 4,
                               "PerceiverLayer": 4}


def test_language_config_qk_and_v_head_dims_differ():
    # hf-language: qk head dim 32, v head dim 160; the MLM decoder has 8 heads of (32, 8)
    config = PerceiverConfig(num_latents=16, d_latents=320, d_model=64, qk_channels=64, v_channels=320,
                             num_cross_attention_heads=2, num_self_attention_heads=2, num_self_attends_per_block=2,
                             max_position_embeddings=40, vocab_size=50)
    model = hf.PerceiverForMaskedLM(config).eval()
    cross = model.perceiver.encoder.cross_attention.attention.self
    assert (cross.qk_channels_per_head, cross.v_channels_per_head) == (32, 160)
    tokens = torch.randint(0, 50, (2, 40))

    def run(m, ids, mask):
        return m(inputs=ids, attention_mask=mask).logits

    check_patched_model(model, run, tokens, padding_mask(2, 40))


def test_single_layer_with_4d_mask_and_head_dim_322():
    # hf-vision-conv: one cross-attention head of dim 322; the layer alone gets HF's (B, 1, N, M) mask
    config = PerceiverConfig(attention_probs_dropout_prob=0.0)
    layer = hf.PerceiverLayer(config, is_cross_attention=True, num_heads=1, q_dim=48, kv_dim=322).eval()
    batch, latents, keys = 2, 7, 150
    additive = (1 - padding_mask(batch, keys))[:, None, None, :] * torch.finfo(torch.float32).min
    additive = additive.expand(batch, 1, latents, keys).contiguous()

    def run(m, hidden, inputs, mask):
        return m(hidden, inputs=inputs, inputs_mask=mask)[0]

    report = check_patched_model(layer, run, torch.randn(batch, latents, 48), torch.randn(batch, keys, 322), additive)
    assert report.replaced == {"PerceiverSelfAttention": 1, "Linear": 6, "PerceiverAttention": 1, "PerceiverLayer": 1}


def test_patched_forward_forms_no_score_sized_tensor():
    # N x M (one batch item, one head) outgrows the input and every M x d intermediate
    num_latents, side, batch = 640, 48, 2
    model = vision_fourier(num_latents=num_latents, d_latents=32, image_size=side)
    pixels, mask = torch.randn(batch, 3, side, side), padding_mask(batch, side * side)
    score_bytes = num_latents * side * side * 4
    unpatched, _ = largest_tensor_in(run_classifier, model, pixels, mask)
    assert unpatched >= batch * score_bytes  # the probe sees HF's scores and mask
    pf.patch(model)
    patched, op = largest_tensor_in(run_classifier, model, pixels, mask)
    assert patched < score_bytes, f"{op} produced {patched} bytes"


def test_output_attentions_falls_back_to_hf():
    model = vision_fourier()
    fast = copy.deepcopy(model)
    pf.patch(fast)
    pixels, mask = torch.randn(2, 3, 9, 9), padding_mask(2, 81)
    want = model(inputs=pixels, attention_mask=mask, output_attentions=True)
    with FallbackLog() as fallbacks:
        got = fast(inputs=pixels, attention_mask=mask, output_attentions=True)
    # every call: the cross-attention, 2 self-attends x 2 blocks, the decoder
    assert fallbacks.reasons == ["patched PerceiverSelfAttention keeps the original computation: output_attentions=True"] * 6
    assert len(got.cross_attentions) == len(want.cross_attentions) == 2
    for g, w in zip(got.cross_attentions + got.attentions, want.cross_attentions + want.attentions):
        assert relative_error(g, w) <= 1e-6
    assert relative_error(got.logits, want.logits) <= 1e-6


def test_training_with_attention_dropout_runs_fused():
    # HF's default attention_probs_dropout_prob is 0.1: in training the patched model drops inside the
    # kernels (HF's own attention, given the same masks, is the reference), and in eval not at all.
    model = vision_fourier(attention_probs_dropout_prob=0.3).train()
    check_patched_model(model, run_classifier, torch.randn(2, 3, 9, 9), padding_mask(2, 81))
    check_patched_model(model.eval(), run_classifier, torch.randn(2, 3, 9, 9), padding_mask(2, 81))


def test_training_step_with_dropout_forms_no_score_sized_tensor():
    # forward and backward of a patched cross-attention layer in training with dropout: the
    # N x M scores (and their mask) are never stored, where HF's own step stores several.
    config = PerceiverConfig(attention_probs_dropout_prob=0.1)
    layer = hf.PerceiverLayer(config, is_cross_attention=True, num_heads=1, q_dim=32, kv_dim=32).train()
    latents, inputs = torch.randn(1, 256, 32, requires_grad=True), torch.randn(1, 4096, 32, requires_grad=True)
    score_bytes = 256 * 4096 * 4

    def step():
        layer(latents, inputs=inputs)[0].square().sum().backward()

    unpatched, _ = largest_tensor_in(step)
    assert unpatched >= score_bytes
    pf.patch(layer)
    with FallbackLog() as fallbacks:
        patched, op = largest_tensor_in(step)
    assert not fallbacks.reasons
    assert patched < score_bytes // 4, f"{op} produced {patched} bytes"


def test_query_dependent_mask_falls_back_to_hf():
    config = PerceiverConfig(attention_probs_dropout_prob=0.0)
    layer = hf.PerceiverLayer(config, is_cross_attention=True, num_heads=1, q_dim=32, kv_dim=20).eval()
    mask = torch.where(torch.rand(2, 1, 5, 30) < 0.3, torch.finfo(torch.float32).min, 0.0)
    mask[..., 0] = 0.0

    def run(m, hidden, inputs, mask):
        return m(hidden, inputs=inputs, inputs_mask=mask)[0]

    reasons = check_falls_back(layer, run, torch.randn(2, 5, 32), torch.randn(2, 30, 20), mask)
    assert reasons == ["patched PerceiverSelfAttention keeps the original computation: mask differs between queries "
                       "or heads"]


CROSS_ATTENTION = "perceiver.encoder.cross_attention.attention.self"


def triple(module, args, output):
    return 3 * output


@pytest.mark.parametrize("wrap,reason,linear_left", [
    # accelerate's hooks, PEFT-style wrappers and monkeypatches set forward on the instance (the key is
    # then left unswapped too: its swapped forward would never run)
    (lambda key: replace_forward(key, lambda k: 30 * k), "key has its forward replaced on the instance", True),
    (lambda key: key.register_forward_hook(triple), "key has forward hooks", False),
    (lambda key: parametrize.register_parametrization(key, "weight", Doubled()), "key has parametrized weights", False),
], ids=["instance-forward", "hook", "parametrization"])
def test_wrapped_key_leaves_cross_attention_as_is(wrap, reason, linear_left, caplog):
    # the fused input attention reads key.weight instead of calling key
    check_wrapped_left_as_is(vision_fourier(), run_classifier, torch.randn(2, 3, 9, 9), padding_mask(2, 81),
                             unit=CROSS_ATTENTION,
                             wrap=lambda model: wrap(model.get_submodule(f"{CROSS_ATTENTION}.key")),
                             warning=f"patch leaves {CROSS_ATTENTION} (PerceiverSelfAttention) as it is: {reason}",
                             caplog=caplog, linear_left=linear_left_warning(f"{CROSS_ATTENTION}.key", linear_left))


def test_hook_added_after_patching_falls_back_to_hf():
    model = vision_fourier()
    fast = copy.deepcopy(model)
    pf.patch(fast)
    for m in (model, fast):
        m.get_submodule(f"{CROSS_ATTENTION}.value").register_forward_hook(triple)
    pixels, mask = torch.randn(2, 3, 9, 9), padding_mask(2, 81)
    with FallbackLog() as fallbacks:
        got = run_classifier(fast, pixels, mask)
    assert fallbacks.reasons == ["patched PerceiverSelfAttention keeps the original computation: value has forward "
                                 "hooks"]
    assert relative_error(got, run_classifier(model, pixels, mask)) <= 1e-5


@pytest.mark.parametrize("shape", [(2, 80), (3, 81)], ids=["length", "batch"])
def test_attention_mask_of_wrong_shape_raises_naming_it(shape):
    # 81 pixels after the preprocessor; HF itself fails to broadcast the mask against the scores
    model = vision_fourier()
    pf.patch(model)
    expected = f"attention_mask of shape {shape} does not fit the inputs: expected (2, 81)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        run_classifier(model, torch.randn(2, 3, 9, 9), padding_mask(*shape))
    layer = model.get_submodule(CROSS_ATTENTION)
    expected = "inputs_mask of shape (2, 1, 1, 80) does not fit 2 items of 81 keys"
    with pytest.raises(ValueError, match=re.escape(expected)):
        layer(torch.randn(2, 24, 64), inputs=torch.randn(2, 81, 261), inputs_mask=torch.zeros(2, 1, 1, 80))


def test_fully_padded_item_gives_hf_output():
    # HF gives a query with no key the mean of all values; the patched model keeps that answer
    model = vision_fourier()
    mask = padding_mask(2, 81)
    mask[1] = 0
    check_patched_model(model, run_classifier, torch.randn(2, 3, 9, 9), mask, falls_back=True)


def test_state_dict_is_unchanged_and_unpatch_restores():
    model = vision_fourier()
    checkpoint = copy.deepcopy(model.state_dict())
    classes = {name: type(m) for name, m in model.named_modules()}
    pf.patch(model, backend="reference")
    assert list(model.state_dict()) == list(checkpoint)
    patched = type(model.perceiver.encoder.cross_attention.attention.self)
    assert patched is not hf.PerceiverSelfAttention and patched.__name__ == "PerceiverSelfAttention"
    model.load_state_dict(checkpoint)
    restored = pf.unpatch(model)
    assert restored.replaced == {"PerceiverSelfAttention": 4, "PerceiverModel": 1, "Linear": 25, "PerceiverAttention": 4,
                                 "PerceiverLayer": 4}
    assert {name: type(m) for name, m in model.named_modules()} == classes


def test_patch_refuses_what_it_does_not_know():
    with pytest.raises(TypeError, match="no attention module it knows in Linear"):
        pf.patch(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pf.patch("model")
    with pytest.raises(ValueError, match="backend"):
        pf.patch(vision_fourier(), backend="fastest")


def test_single_patched_layer_stores_no_normalised_input_or_keys():
    # pf.patch on one PerceiverLayer runs the fused input attention: LayerNorm(x), K and V, each
    # as large as the input here, are never stored.
    config = PerceiverConfig(attention_probs_dropout_prob=0.0)
    layer = hf.PerceiverLayer(config, is_cross_attention=True, num_heads=1, q_dim=32, kv_dim=64).eval()
    latents, inputs = torch.randn(1, 16, 32), torch.randn(1, 4096, 64)
    input_bytes = inputs.untyped_storage().nbytes()

    def run():
        with torch.no_grad():
            return layer(latents, inputs=inputs)[0]

    unpatched, _ = largest_tensor_in(run)
    assert unpatched >= input_bytes  # the probe sees HF's LayerNorm(x), K and V
    expected = run()
    pf.patch(layer)
    patched, op = largest_tensor_in(run)
    assert patched < input_bytes // 4, f"{op} produced {patched} bytes"
    assert relative_error(run(), expected) <= 1e-4

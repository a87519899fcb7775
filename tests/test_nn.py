"""perceiver_fast.nn modules against a plain float64 computation of the same layer."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import perceiver_fast as pf
from model_checks import relative_error

FP32_TOLERANCE = 1e-4


def reference_attention(q, k, v, key_mask, causal, keep=None, dropout_p=0.0):
    """(B, H, N, D) softmax attention, materialised; a query with no key gives 0; `keep`: a dropout
    keep mask applied to the probabilities, kept ones scaled by 1 / (1 - dropout_p)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n, m = q.shape[2], k.shape[2]
    allowed = torch.ones(q.shape[0], 1, n, m, dtype=torch.bool)
    if causal:
        allowed = allowed & (torch.arange(m)[None, :] <= torch.arange(n)[:, None] + m - n)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1 - dropout_p)
    return probs @ v


def heads(t, h):
    return t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)


def reference_cross(module, latents, inputs, key_mask, causal, keep=None):
    q = heads(F.linear(F.layer_norm(latents, (module.q_dim,), module.q_norm.weight, module.q_norm.bias),
                       module.q_proj.weight, module.q_proj.bias), module.heads)
    normed = F.layer_norm(inputs, (module.kv_dim,), module.kv_norm.weight, module.kv_norm.bias)
    k = heads(F.linear(normed, module.k_proj.weight, module.k_proj.bias), module.heads)
    v = heads(F.linear(normed, module.v_proj.weight, module.v_proj.bias), module.heads)
    out = reference_attention(q, k, v, key_mask, causal, keep, module.dropout).transpose(1, 2).flatten(2)
    out = F.linear(out, module.out_proj.weight, module.out_proj.bias)
    return out + latents if module.query_residual else out


def reference_self(module, x, causal, keep=None):
    normed = F.layer_norm(x, (module.dim,), module.norm.weight, module.norm.bias)
    q, k, v = (heads(F.linear(normed, p.weight, p.bias), module.heads)
               for p in (module.q_proj, module.k_proj, module.v_proj))
    attended = reference_attention(q, k, v, None, causal, keep, module.dropout)
    out = F.linear(attended.transpose(1, 2).flatten(2), module.out_proj.weight, module.out_proj.bias)
    return out + x if module.residual else out


def check_against_float64(module, call, reference, *inputs):
    """Output and every gradient (parameters and floating inputs) of the float32 module vs float64."""
    module64 = copy.deepcopy(module).double()
    leaves32 = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    leaves64 = [t.double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    got, want = call(module, *leaves32), reference(module64, *leaves64)
    assert got.dtype == torch.float32 and relative_error(got, want) <= FP32_TOLERANCE
    weight = torch.randn(want.shape, dtype=torch.float64)
    (want * weight).sum().backward()
    (got * weight.float()).sum().backward()
    pairs = [(a.grad, b.grad, name) for (name, a), b in zip(module.named_parameters(), module64.parameters())]
    pairs += [(a.grad, b.grad, "input") for a, b in zip(leaves32, leaves64) if b.is_floating_point()]
    # a key bias shifts every score of a row equally: its exact gradient is 0
    floor = 1e-3 * float(torch.cat([w.flatten() for _, w, _ in pairs]).norm())
    for g, w, name in pairs:
        assert relative_error(g, w, floor) <= FP32_TOLERANCE, name


@pytest.mark.parametrize("heads_, qk, v, q_dim, kv_dim", [
    (1, 261, 261, 64, 261),   # hf-vision-fourier: one head of 261 over C = 261
    (2, 64, 320, 48, 24),     # hf-language: qk head 32, v head 160; C smaller than the head dims
    (4, 32, 32, 40, 7),
])
@pytest.mark.parametrize("masking", ["none", "key_mask", "causal", "both"])
def test_cross_attention(heads_, qk, v, q_dim, kv_dim, masking):
    module = pf.nn.CrossAttention(q_dim, kv_dim, heads=heads_, qk_channels=qk, v_channels=v)
    batch, n, m = 2, 9, 45
    key_mask = torch.rand(batch, m) > 0.3 if masking in ("key_mask", "both") else None
    causal = masking in ("causal", "both")
    check_against_float64(module, lambda mod, a, b: mod(a, b, key_mask, causal),
                          lambda mod, a, b: reference_cross(mod, a, b, key_mask, causal),
                          torch.randn(batch, n, q_dim), torch.randn(batch, m, kv_dim))


def test_cross_attention_without_residual_to_other_width():
    module = pf.nn.CrossAttention(16, 12, heads=2, out_dim=10, query_residual=False)
    out = module(torch.randn(3, 5, 16), torch.randn(3, 20, 12))
    assert out.shape == (3, 5, 10)
    check_against_float64(module, lambda mod, a, b: mod(a, b), lambda mod, a, b: reference_cross(mod, a, b, None, False),
                          torch.randn(3, 5, 16), torch.randn(3, 20, 12))


def test_layer_mlp_takes_the_attention_output_width():
    layer = pf.nn.PerceiverLayer(pf.nn.CrossAttention(16, 12, out_dim=10, query_residual=False), widening=2)
    assert layer(torch.randn(2, 3, 16), torch.randn(2, 20, 12)).shape == (2, 3, 10)


def test_cross_attention_query_without_key_gives_latent_residual_only():
    module = pf.nn.CrossAttention(16, 12, heads=2)
    latents, mask = torch.randn(2, 4, 16), torch.ones(2, 30, dtype=torch.bool)
    mask[1] = False
    out = module(latents, torch.randn(2, 30, 12), mask)
    # no key: attention gives 0, so the item is the output projection's bias plus the residual
    assert torch.allclose(out[1], latents[1] + module.out_proj.bias, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_, qk, v", [(8, 64, 64), (2, 64, 320)])
def test_self_attention(causal, heads_, qk, v):
    module = pf.nn.SelfAttention(64, heads=heads_, qk_channels=qk, v_channels=v)
    check_against_float64(module, lambda mod, x: mod(x, causal), lambda mod, x: reference_self(mod, x, causal),
                          torch.randn(2, 33, 64))


def test_encoder_matches_its_layers_computed_by_hand():
    encoder = pf.nn.PerceiverEncoder(10, num_latents=6, latent_dim=32, cross_heads=1, self_heads=4, self_layers=2,
                                     blocks=2, widening=2)

    def reference(enc, inputs, mask):
        x = enc.latents.expand(inputs.shape[0], -1, -1)
        x = reference_cross(enc.cross.attention, x, inputs, mask, False)
        x = x + enc.cross.mlp(x)
        for _ in range(enc.blocks):
            for layer in enc.self_attends:
                x = reference_self(layer.attention, x, False)
                x = x + layer.mlp(x)
        return x

    mask = torch.rand(2, 50) > 0.2
    check_against_float64(encoder, lambda enc, inputs: enc(inputs, mask), lambda enc, inputs: reference(enc, inputs, mask),
                          torch.randn(2, 50, 10))
    assert encoder(torch.randn(3, 50, 10)).shape == (3, 6, 32)


def test_parameters_initialised_like_torch():
    module = pf.nn.CrossAttention(64, 20)
    bound = 1 / math.sqrt(20)
    assert module.k_proj.weight.abs().max() <= bound and module.k_proj.weight.std() > bound / 4
    assert torch.equal(module.kv_norm.weight, torch.ones(20)) and torch.equal(module.kv_norm.bias, torch.zeros(20))


def test_bad_arguments_are_named():
    module = pf.nn.CrossAttention(16, 12, heads=2)
    with pytest.raises(ValueError, match=r"inputs must have shape \(B, L, 12\)"):
        module(torch.randn(2, 4, 16), torch.randn(2, 30, 13))
    with pytest.raises(ValueError, match="latents must have shape"):
        module(torch.randn(4, 16), torch.randn(2, 30, 12))
    with pytest.raises(ValueError, match="inputs batch 3 must equal latents batch 2"):
        module(torch.randn(2, 4, 16), torch.randn(3, 30, 12))
    with pytest.raises(ValueError, match="key_mask"):
        module(torch.randn(2, 4, 16), torch.randn(2, 30, 12), torch.ones(2, 29, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"qk_channels \(10\) must be divisible by heads \(4\)"):
        pf.nn.CrossAttention(16, 12, heads=4, qk_channels=10)
    with pytest.raises(ValueError, match="query_residual needs out_dim == q_dim"):
        pf.nn.CrossAttention(16, 12, out_dim=8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pf.nn.SelfAttention(16, heads=2)([1.0])


@pytest.mark.parametrize("build,error,message", [
    (lambda: pf.nn.SelfAttention(8, heads=0), ValueError, r"heads must be an int >= 1, got 0"),
    (lambda: pf.nn.SelfAttention(8, heads=2.0), TypeError, r"heads must be an int >= 1, got float"),
    (lambda: pf.nn.SelfAttention(8, heads=3), ValueError,
     r"dim \(8, the default qk_channels\) must be divisible by heads \(3\)"),
    (lambda: pf.nn.SelfAttention(8, heads=2, v_channels=0), ValueError, r"v_channels must be an int >= 1, got 0"),
    (lambda: pf.nn.SelfAttention(8, heads=2, residual=1), TypeError, r"residual must be a bool, got int"),
    (lambda: pf.nn.CrossAttention(16, 0), ValueError, r"kv_dim must be an int >= 1, got 0"),
    (lambda: pf.nn.CrossAttention(16, 12, qk_channels=0), ValueError, r"qk_channels must be an int >= 1, got 0"),
    (lambda: pf.nn.CrossAttention(16, 12, heads=2, v_channels=5), ValueError,
     r"v_channels \(5\) must be divisible by heads \(2\)"),
    (lambda: pf.nn.MLP(8, widening=0), ValueError, r"widening must be an int >= 1, got 0"),
    (lambda: pf.nn.PerceiverLayer(torch.nn.Linear(8, 8)), TypeError,
     r"attention must be a perceiver_fast.nn CrossAttention or SelfAttention, got torch\.nn\.modules\.linear\.Linear"),
    (lambda: pf.nn.PerceiverEncoder(8, num_latents=0), ValueError, r"num_latents must be an int >= 1, got 0"),
    (lambda: pf.nn.PerceiverEncoder(8, latent_dim=12, self_heads=8), ValueError,
     r"latent_dim \(12\) must be divisible by self_heads \(8\)"),
    (lambda: pf.nn.PerceiverEncoder(8, latent_dim=12, cross_heads=5), ValueError,
     r"latent_dim \(12, the default cross_qk_channels\) must be divisible by cross_heads \(5\)"),
    (lambda: pf.nn.PerceiverEncoder(8, latent_dim=12, self_heads=4, self_layers=-1), ValueError,
     r"self_layers must be an int >= 0, got -1"),
    (lambda: pf.nn.PerceiverEncoder(0), ValueError, r"input_dim must be an int >= 1, got 0"),
])
def test_constructor_arguments_are_checked_at_construction(build, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        build()


def test_numpy_sizes_and_flags_are_taken():
    np = pytest.importorskip("numpy")
    module = pf.nn.SelfAttention(np.int64(8), heads=np.int64(2), residual=np.bool_(False))
    assert module(torch.randn(1, 3, 8)).shape == (1, 3, 8) and module.heads == 2 and not module.residual


@pytest.mark.parametrize("kind", ["cross", "self"])
def test_modules_drop_attention_in_training_only(kind):
    # The dropout mask is the one pf.attention_dropout_mask shows for the same generator state.
    if kind == "cross":
        module = pf.nn.CrossAttention(24, 20, heads=2, dropout=0.3)
        inputs, keys = (torch.randn(2, 6, 24), torch.randn(2, 40, 20)), 40
        reference = lambda m, keep: reference_cross(m, *[t.double() for t in inputs], None, False, keep)  # noqa: E731
    else:
        module = pf.nn.SelfAttention(24, heads=2, dropout=0.3)
        inputs, keys = (torch.randn(2, 6, 24),), 6
        reference = lambda m, keep: reference_self(m, inputs[0].double(), True, keep)  # noqa: E731
    call = (lambda: module(*inputs)) if kind == "cross" else (lambda: module(*inputs, causal=True))
    module64 = copy.deepcopy(module).double()
    torch.manual_seed(5)
    keep = pf.attention_dropout_mask(2, 2, 6, keys, 0.3)
    torch.manual_seed(5)
    assert relative_error(call(), reference(module64, keep)) <= FP32_TOLERANCE
    module.eval()
    state = torch.get_rng_state()
    assert relative_error(call(), reference(module64, None)) <= FP32_TOLERANCE
    assert torch.equal(torch.get_rng_state(), state)  # eval draws no seed
    with pytest.raises(ValueError, match="dropout_p must be in"):
        pf.nn.SelfAttention(24, heads=2, dropout=1.0)

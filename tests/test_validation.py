"""Bad input raises a TypeError or ValueError naming the argument and what was expected."""

import pytest
import torch

import perceiver_fast as pf


def inputs(B=2, H=2, N=4, M=6, dqk=8, dv=5, dtype=torch.float32):
    return (torch.randn(B, H, N, dqk, dtype=dtype), torch.randn(B, H, M, dqk, dtype=dtype),
            torch.randn(B, H, M, dv, dtype=dtype))


@pytest.mark.parametrize("fn", [pf.cross_attention, pf.latent_attention])
def test_wrong_rank(fn):
    q, k, v = inputs(N=6)
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, H, N, Dqk\), got shape \(2, 6, 8\)"):
        fn(q[:, 0], k, v, backend="reference")
    with pytest.raises(ValueError, match=r"v must be 4-D"):
        fn(q, k, v[0], backend="reference")


def test_not_a_tensor():
    q, k, v = inputs()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        pf.cross_attention(q, k.numpy(), v)


def test_mismatched_dims():
    q, k, v = inputs()
    with pytest.raises(ValueError, match=r"k must have shape \(B, H, M, Dqk\) = \(2, 2, M, 8\)"):
        pf.cross_attention(q, k[..., :7], v)
    with pytest.raises(ValueError, match=r"k must have shape"):
        pf.cross_attention(q, k[:1], v[:1])  # no broadcasting over batch
    with pytest.raises(ValueError, match=r"v must have shape \(B, H, M, Dv\) = \(2, 2, 6, Dv\)"):
        pf.cross_attention(q, k, v[:, :, :5])


def test_dtype_mix_and_unsupported_dtype():
    q, k, v = inputs()
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        pf.cross_attention(q, k.double(), v)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        pf.cross_attention(q.int(), k.int(), v.int())


def test_head_dim_limit_and_empty_dims():
    q, k, v = inputs(dqk=1025, dv=4)
    with pytest.raises(ValueError, match="Dqk must be at most 1024, got 1025"):
        pf.cross_attention(q, k, v)
    q, k, v = inputs(M=0)
    with pytest.raises(ValueError, match="k must have no empty dimension"):
        pf.cross_attention(q, k, v)


@pytest.mark.parametrize("mask,error,message", [
    (torch.ones(2, 5, dtype=torch.bool), ValueError, r"key_mask must have shape \(B, M\) = \(2, 6\), got \(2, 5\)"),
    (torch.ones(1, 6, dtype=torch.bool), ValueError, r"key_mask must have shape \(B, M\) = \(2, 6\)"),
    (torch.ones(2, 1, 1, 6, dtype=torch.bool), ValueError, r"key_mask must have shape"),
    (torch.ones(2, 6), TypeError, r"key_mask must have dtype torch.bool"),
    ([[True] * 6] * 2, TypeError, r"key_mask must be a bool torch.Tensor"),
])
def test_bad_key_mask(mask, error, message):
    q, k, v = inputs()
    with pytest.raises(error, match=message):
        pf.cross_attention(q, k, v, key_mask=mask)


def test_bad_flags_and_scale():
    q, k, v = inputs()
    with pytest.raises(TypeError, match="causal must be a bool"):
        pf.cross_attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        pf.cross_attention(q, k, v, return_lse="yes")
    with pytest.raises(TypeError, match="scale must be a real number or None"):
        pf.cross_attention(q, k, v, scale=torch.tensor(0.5))
    with pytest.raises(ValueError, match="scale must be finite"):
        pf.cross_attention(q, k, v, scale=float("nan"))


def test_numpy_bools_are_bools_and_rejected_types_are_named_in_full():
    np = pytest.importorskip("numpy")
    q, k, v = inputs()
    expected = pf.cross_attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(pf.cross_attention(q, k, v, causal=np.bool_(True), backend="reference"), expected)
    _, lse = pf.cross_attention(q, k, v, return_lse=np.bool_(True), backend="reference")
    assert lse.shape == q.shape[:3]
    with pytest.raises(TypeError, match=r"^causal must be a bool, got numpy\.int64$"):
        pf.cross_attention(q, k, v, causal=np.int64(1))
    with pytest.raises(TypeError, match=r"^causal must be a bool, got int$"):
        pf.cross_attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match=r"^scale must be a real number or None, got torch\.Tensor$"):
        pf.cross_attention(q, k, v, scale=torch.tensor(0.5))


def test_explain_names_its_own_argument():
    q, k, v = inputs()
    with pytest.raises(TypeError, match=r"^pf\.explain's op must be one of pf\.cross_attention, pf\.latent_attention, "
                                        r"pf\.fused_input_attention, pf\.linear, or a q tensor \(short for pf\.cross_attention\), "
                                        r"got None$"):
        pf.explain(None)
    with pytest.raises(TypeError, match=r"got list$"):
        pf.explain([q, k, v])
    for call in (lambda: pf.explain(pf.cross_attention, q), lambda: pf.explain(q)):
        with pytest.raises(TypeError, match=r"^pf\.explain\(pf\.cross_attention, \.\.\.\) takes "
                                            r"pf\.cross_attention's arguments: missing a required argument: 'k'$"):
            call()


def test_dropout_mask_names_a_device_its_backend_cannot_draw_on():
    with pytest.raises(ValueError, match=r"^device must be one that backend 'cpu' runs on \(cpu\), got meta: the mask "
                                         r"is drawn by that backend's kernels, on that device$"):
        pf.attention_dropout_mask(1, 1, 2, 2, 0.5, device="meta")
    with pytest.raises(ValueError, match=r"^device must name a device, such as 'cpu' or 'cuda:0', got 'gpu0'$"):
        pf.attention_dropout_mask(1, 1, 2, 2, 0.5, device="gpu0")
    with pytest.raises(TypeError, match=r"^device must be a torch.device or a device name such as 'cpu', got float$"):
        pf.attention_dropout_mask(1, 1, 2, 2, 0.5, device=0.5)
    with pytest.raises(TypeError, match=r"^keys must be an int >= 0, got float$"):
        pf.attention_dropout_mask(1, 1, 2, 2.0, 0.5)
    assert pf.attention_dropout_mask(1, 1, 2, 2, 0.5, device=torch.device("cpu")).shape == (1, 1, 2, 2)


def test_latent_needs_square_problem():
    q, k, v = inputs(N=4, M=6)
    with pytest.raises(ValueError, match="latent_attention is self-attention.*N=4.*M=6"):
        pf.latent_attention(q, k, v)


def test_scale_default_and_explicit():
    q, k, v = inputs(dqk=9)
    out = pf.cross_attention(q, k, v, backend="reference")
    explicit = pf.cross_attention(q, k, v, scale=1 / 3, backend="reference")
    torch.testing.assert_close(out, explicit)
    other = pf.cross_attention(q, k, v, scale=0.1, backend="reference")
    assert not torch.allclose(out, other)

"""Triton backend against the float64 reference: forward, lse and gradients.

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
`make test`), with small shapes; the `gpu` tests run the compiled kernels on CUDA.
"""

import os

import pytest
import torch
from checks import (CROSS_SHAPES, LATENT_SHAPES, MASKINGS, assert_lse_matches, assert_matches, check_attention,
                    check_non_contiguous, kernel_runner, random_inputs, random_key_mask)

import perceiver_fast as pf

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")


def cross(num_splits=None):
    return kernel_runner("triton", "cross", (num_splits,) if num_splits else ())


@interpreted
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("shape", CROSS_SHAPES.values(), ids=CROSS_SHAPES.keys())
def test_cross_attention_float32(shape, key_mask, causal):
    check_attention(cross(num_splits=1), shape, torch.float32, key_mask, causal)


@interpreted
@pytest.mark.parametrize("num_splits", [2, 3, 64])
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("shape", ["small", "m1000", "d261", "qk32-v160"])
def test_cross_attention_split_keys(shape, key_mask, causal, num_splits):
    # 64 splits is more than there are key tiles: the launcher clamps it.
    check_attention(cross(num_splits=num_splits), CROSS_SHAPES[shape], torch.float32, key_mask, causal)


@interpreted
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", ["small", "d261", "qk32-v160", "n257"])
def test_cross_attention_half(shape, dtype, num_splits):
    check_attention(cross(num_splits=num_splits), CROSS_SHAPES[shape], dtype, key_mask=True, causal=True)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", LATENT_SHAPES.values(), ids=LATENT_SHAPES.keys())
def test_latent_attention(shape, causal, dtype):
    check_attention(kernel_runner("triton", "latent"), shape, dtype, key_mask=False, causal=causal)


@interpreted
def test_public_functions_dispatch_to_triton():
    q, k, v = random_inputs(2, 2, 10, 40, 16, 24)
    mask = random_key_mask(2, 40)
    out, lse = pf.cross_attention(q, k, v, key_mask=mask, causal=True, scale=0.3, return_lse=True,
                                  backend="triton")
    ref, ref_lse = pf.attention_reference(q.double(), k.double(), v.double(), key_mask=mask, causal=True, scale=0.3)
    assert_matches("out", out, ref)
    assert_lse_matches(lse, ref_lse)
    ql, kl, vl = random_inputs(2, 2, 30, 30, 16, 16)
    out = pf.latent_attention(ql, kl, vl, causal=True, backend="triton")
    ref, _ = pf.attention_reference(ql.double(), kl.double(), vl.double(), causal=True)
    assert_matches("latent out", out, ref)


@interpreted
def test_non_contiguous_inputs():
    check_non_contiguous(cross(num_splits=2))


GPU_CASES = {
    "hf-vision-fourier-like": (2, 1, 512, 4096, 261, 261),
    "hf-language-cross": (2, 8, 256, 2048, 32, 160),
    "perceiver-ar-like": (1, 4, 256, 2048, 64, 64),
    "d1024": (1, 1, 64, 1000, 1024, 1024),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("shape", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_cross_attention_gpu(shape, key_mask, causal, dtype):
    check_attention(cross(), shape, dtype, key_mask, causal, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 8, 512, 512, 128, 128), (2, 16, 2048, 2048, 32, 32),
                                   (2, 8, 256, 256, 32, 160)])
def test_latent_attention_gpu(shape, dtype):
    check_attention(kernel_runner("triton", "latent"), shape, dtype, key_mask=False, causal=False)

"""cpu backend (C++ kernels in csrc/cpu/) against the float64 reference: forward, lse and gradients.

The kernels' default tiles (256 keys x 256 rows) would put every small test input in one tile
of one worker, so most cases force small tiles and more workers than threads: tile tails, rows
cut by causal masking, split heads and the merge of their partial results are all reached.
"""

import os
import tempfile

import pytest
import torch
from checks import (CROSS_SHAPES, ISA_PATHS, ROW_PATHS, forced_cpu_path, LATENT_SHAPES, MASKINGS, assert_matches, check_attention, check_non_contiguous,
                    kernel_runner, random_inputs, random_key_mask, reference_with_grads)

import perceiver_fast as pf
from perceiver_fast.extension import compiled as _C

# (key_tile, row_block, workers[, query_chunk]); 0 = the kernel's default. A query chunk of 3 rows
# runs every shape's query axis in chunks (backends/cpu.py), causal chunks over the keys they see.
TILINGS = {"default": (0, 0, 0), "small-tiles": (16, 8, 3), "odd-tiles": (7, 5, 4), "query-chunks": (16, 8, 3, 3)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def cpu(key_tile=0, row_block=0, workers=0, query_chunk=0):
    return kernel_runner("cpu", tiling=(key_tile, row_block, workers, query_chunk))


@pytest.mark.parametrize("tiling", TILINGS.values(), ids=TILINGS.keys())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("shape", CROSS_SHAPES.values(), ids=CROSS_SHAPES.keys())
def test_cross_attention(shape, key_mask, causal, dtype, tiling):
    check_attention(cpu(*tiling), shape, dtype, key_mask, causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", LATENT_SHAPES.values(), ids=LATENT_SHAPES.keys())
def test_latent_attention(shape, causal, dtype):
    B, H, N, M, dqk, dv = shape
    q, k, v = random_inputs(B, H, N, M, dqk, dv, dtype=dtype)
    out = pf.latent_attention(q, k, v, causal=causal, backend="cpu")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out64, _, grads64 = reference_with_grads(q, k, v, dout, causal=causal)
    same = (reference_with_grads(q, k, v, dout, causal=causal, compute_dtype=dtype) if dtype == torch.bfloat16
            else (None, None, (None, None, None)))
    assert_matches("out", out, out64, same[0])
    for name, g, g64, g_same in zip(("dq", "dk", "dv"), grads, grads64, same[2]):
        assert_matches(name, g, g64, g_same)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["small", "d261", "qk32-v160", "one-key"])
def test_portable_gemm_path(shape, dtype):
    # The at::mm path that CPUs without oneDNN's brgemm (or without AVX512-BF16) take.
    with forced_cpu_path("portable-gemm"):
        check_attention(cpu(16, 8, 3), CROSS_SHAPES[shape], dtype, key_mask=True, causal=True)


# Heads of at most 4 queries (a decode step) take the few-query forward (csrc/cpu/attention_forward.cpp):
# K and V rows read in place by csrc/cpu/key_rows*.cpp. Head dims below, at and across the 16 float lanes.
FEW_QUERY_SHAPES = {"n1-d64": (2, 2, 1, 300, 64, 64), "n2-d100-v40": (1, 3, 2, 257, 100, 40),
                    "n3-d7-v9": (2, 1, 3, 90, 7, 9), "n4-d261": (1, 1, 4, 130, 261, 261),
                    "n4-m2": (2, 2, 4, 2, 16, 16)}


@pytest.mark.parametrize("rows", ROW_PATHS)
@pytest.mark.parametrize("tiling", [(0, 0, 0), (16, 8, 3), (7, 5, 4)], ids=["default", "small-tiles", "odd-tiles"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("shape", FEW_QUERY_SHAPES.values(), ids=FEW_QUERY_SHAPES.keys())
def test_few_query_forward(shape, key_mask, causal, dtype, tiling, rows):
    with forced_cpu_path(rows):
        check_attention(cpu(*tiling), shape, dtype, key_mask, causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
def test_few_query_forward_with_dropout(key_mask, causal, dtype):
    check_attention(cpu(16, 8, 3), FEW_QUERY_SHAPES["n3-d7-v9"], dtype, key_mask, causal, dropout_p=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phase_timing_covers_each_phase_only_while_on(dtype):
    # The benchmark engine's per-phase breakdown (csrc/cpu/phase_timer.h): 3 workers over one head
    # split it, so merge runs; a 1-query call takes the few-query path.
    q, k, v = random_inputs(1, 1, 40, 600, 32, 32, dtype=dtype)
    one = random_inputs(1, 2, 1, 600, 32, 32, dtype=dtype)[0]
    run = cpu(64, 16, 3)
    _C.take_phase_seconds()
    run(q, k, v, None, False)
    assert set(_C.take_phase_seconds().values()) == {0.0}, "nothing is timed while timing is off"
    _C.set_phase_timing(True)
    try:
        out, _ = run(q, k, v, None, False)
        out.backward(torch.randn_like(out))
        run(one, k[:, :1].expand(1, 2, -1, -1), v[:, :1].expand(1, 2, -1, -1), None, False)
    finally:
        _C.set_phase_timing(False)
    seconds = _C.take_phase_seconds()
    # bf16 probabilities are converted for bf16 GEMMs; without bf16 dot products the GEMMs run in float32.
    converts = dtype == torch.bfloat16 and _C.cpu_features()["brgemm_bf16_vnni"]
    timed = {"load", "pack", "gemm", "softmax", "store", "merge", "key_rows"} | ({"convert"} if converts else set())
    assert set(seconds) == {"load", "pack", "gemm", "softmax", "convert", "store", "merge", "key_rows"}
    assert {name for name, s in seconds.items() if s > 0} == timed, seconds
    assert set(_C.take_phase_seconds().values()) == {0.0}, "taking the seconds resets them"


@pytest.mark.parametrize("rows", ROW_PATHS)
@pytest.mark.parametrize("key_tile", [16, 96])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("scores", ["rising", "wide", "spike"])
def test_running_max_jumps(scores, key_mask, causal, dtype, dropout_p, key_tile, rows):
    """The forward's softmax keeps a row's running max until a score passes it by 2^8 (lazy rescaling,
    csrc/cpu/softmax_rows_avx512.cpp); here scores jump past it within and across key tiles: "rising"
    scores climb by about 10 (base e) over the keys, "wide" ones spread with a standard deviation of 8,
    and in "spike" key 136 scores about 8 above the others for every row. Key tiles of 96 keys put a
    jump after written probabilities, which float32 then rescales: the spike always, 40 keys into
    the second tile."""
    B, H, N, M, D = 2, 2, 9, 200, 16
    q, k, v = (t.detach() for t in random_inputs(B, H, N, M, D, D))
    direction = q.mean(2, keepdim=True) / q.mean(2, keepdim=True).norm(dim=-1, keepdim=True)
    if scores == "rising":
        k = k + torch.linspace(0, 10, M)[:, None] * direction
        q = q + 4 * direction
    elif scores == "spike":
        q = q + 4 * direction
        k[:, :, 136:137] += 8 * direction
    else:
        q = q * 8
    mask = random_key_mask(B, M) if key_mask else None
    if mask is not None:
        mask[1:, 136] = True  # the spike stays a key wherever a batch entry has any
    with forced_cpu_path(rows):
        check_attention(cpu(key_tile, 8, 3), (B, H, N, M, D, D), dtype, False if mask is None else mask, causal,
                        dropout_p=dropout_p, inputs=(q, k, v))


# What each lower level runs (csrc/cpu/vector_paths.h): avx512 (Skylake-X to Ice Lake) the AVX-512
# packing and few-query rows with the SIMD softmax steps; avx2 (Zen 2/3, Intel client CPUs) the SIMD
# rows; portable the scalar loops. Below avx512_bf16, bfloat16 inputs are widened to float32 GEMMs.
@pytest.mark.parametrize("level", ISA_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("shape", ["small", "d261", "qk32-v160", "tiny-heads", "one-query"])
def test_lower_instruction_set_levels(shape, key_mask, causal, dtype, level):
    with forced_cpu_path(level):
        features = _C.cpu_features()
        assert features["isa"] == level and features["isa_cap"] == level
        assert features["brgemm_bf16_vnni"] == (level == "avx512_bf16")
        check_attention(cpu(16, 8, 3), CROSS_SHAPES[shape], dtype, key_mask, causal)


def test_public_functions_dispatch_to_cpu():
    q, k, v = random_inputs(2, 2, 10, 40, 16, 24)
    mask = random_key_mask(2, 40)
    out, lse = pf.cross_attention(q, k, v, key_mask=mask, causal=True, scale=0.3, return_lse=True)
    ref, ref_lse = pf.attention_reference(q.double(), k.double(), v.double(), key_mask=mask, causal=True, scale=0.3)
    assert_matches("out", out, ref)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


def test_non_contiguous_inputs():
    # A strided last dimension is copied by the binding; other strides are read in place.
    check_non_contiguous(cpu(16, 8, 3))


def test_every_key_masked_gives_zeros_and_zero_grads():
    q, k, v = random_inputs(2, 2, 5, 300, 8, 8)
    mask = torch.zeros(2, 300, dtype=torch.bool)
    out, lse = cpu()(q, k, v, key_mask=mask, causal=False)
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all((g == 0).all() for g in grads)


def test_binding_rejects_bad_inputs():
    ops = _C
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    with pytest.raises(RuntimeError, match="k must be \\(B, H, M, Dqk\\)"):
        ops.cpu_attention_forward(q, k[..., :4], v, None, False, 1.0)
    with pytest.raises(RuntimeError, match="key_mask must be \\(B, M\\) = \\(1, 6\\)"):
        ops.cpu_attention_forward(q, k, v, torch.ones(1, 5, dtype=torch.bool), False, 1.0)
    with pytest.raises(RuntimeError, match="must be float32, float64 or bfloat16"):
        ops.cpu_attention_forward(q.half(), k.half(), v.half(), None, False, 1.0)
    with pytest.raises(RuntimeError, match="v must have q's dtype"):
        ops.cpu_attention_forward(q, k, v.double(), None, False, 1.0)


def test_cpu_features_reports_the_paths_in_use():
    features = _C.cpu_features()
    levels = features["isa_levels"]
    assert features["isa_cap"] == (os.environ.get("PERCEIVER_FAST_CPU_ISA") or "none")
    assert levels.index(features["isa"]) <= levels.index(features["isa_detected"])
    level = levels.index(features["isa"])
    assert not features["portable_gemm_forced"]
    if os.path.exists("/proc/cpuinfo") and levels[1] == "avx2":
        # The levels are those the CPU allows, whichever order the library's files were initialised in.
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
        avx2 = {"avx2", "fma"} <= flags
        avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
        detected = 3 if avx512 and "avx512_bf16" in flags else 2 if avx512 else 1 if avx2 else 0
        assert features["isa_detected"] == levels[detected]
        assert features["avx512_philox"] == (level >= 2 and "bmi2" in flags)
    assert features["simd_rows"] == (level >= 1)
    assert features["avx512_rows"] == (level >= 2)
    assert features["avx512_softmax"] == (level >= 3)
    assert not features["brgemm_bf16_vnni"] or level >= 3


@pytest.mark.parametrize("value", ["avx3", "AVX2", "neon" if os.uname().machine == "x86_64" else "avx2"])
def test_an_unknown_isa_cap_is_refused_at_import(value):
    import subprocess
    import sys
    env = {**os.environ, "PERCEIVER_FAST_CPU_ISA": value}
    # Out of the source tree, so that the package imported is the one under test (an installed copy in CI's other venvs).
    result = subprocess.run([sys.executable, "-c", "import perceiver_fast"], env=env, capture_output=True, text=True,
                            cwd=tempfile.gettempdir())
    assert result.returncode != 0
    assert f"PERCEIVER_FAST_CPU_ISA={value!r}" in result.stderr and "expected one of portable" in result.stderr


def test_an_isa_cap_from_the_environment_caps_every_path():
    import subprocess
    import sys
    env = {**os.environ, "PERCEIVER_FAST_CPU_ISA": "portable"}
    code = "from perceiver_fast.extension import compiled as c; f = c.cpu_features(); print(f['isa'], f['isa_cap'], f['simd_rows'], f['avx512_philox'], f['brgemm_float'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                            cwd=tempfile.gettempdir())
    assert result.stdout.split() == ["portable", "portable", "False", "False", "False"]


def test_long_query_axes_run_in_chunks_of_bounded_workspace():
    """backends/cpu.py: the kernels' per-row workspace, 4 (dqk + 2 dv + 4) bytes per worker, stays
    within QUERY_WORKSPACE_BYTES; causal chunks take the keys their rows see."""
    from perceiver_fast.backends.cpu import QUERY_WORKSPACE_BYTES, _query_chunks

    rows = QUERY_WORKSPACE_BYTES // (2 * 4 * (512 + 2 * 512 + 4))
    assert _query_chunks(11408, 2048, False, (0, 0, 2), 512, 512) == [(slice(0, 11408), 2048)]
    chunks = _query_chunks(182528, 2048, False, (0, 0, 2), 512, 512)
    assert len(chunks) == -(-182528 // rows) and chunks[0] == (slice((len(chunks) - 1) * rows, 182528), 2048)
    assert all(c.stop - c.start <= rows for c, _ in chunks)
    # Small workspaces keep chunks of at least 4096 rows; tiling[3] sets the rows (tests).
    assert len(_query_chunks(8192, 100, False, (0, 0, 64), 1024, 1024)) == 2
    # Causal, 10 queries over 6 keys in chunks of 4: rows 8-9 see 6 keys, 4-7 see 4, 0-3 none.
    assert _query_chunks(10, 6, True, (0, 0, 1, 4), 8, 8) == [(slice(8, 10), 6), (slice(4, 8), 4), (slice(0, 4), 0)]

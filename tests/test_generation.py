"""perceiver_fast.generation: Perceiver AR generation of krasserm's CausalSequenceModel over the
preallocated cache, against krasserm's own cached forward and a cache-free recomputation."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("perceiver.model.core")
from perceiver.model.core.config import CausalSequenceModelConfig  # noqa: E402
from perceiver.model.core.modules import CausalSequenceModel  # noqa: E402

import perceiver_fast as pf  # noqa: E402
from perceiver_fast.generation import KrassermPerceiverAR, KVRing, generate  # noqa: E402
from perceiver_fast.generation.reference import KrassermCachedForward, greedy_reference  # noqa: E402

VOCAB, MAX_SEQ_LEN, MAX_LATENTS = 40, 24, 8
BACKENDS = ["cpu", "reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def build_model(seed: int = 0, **overrides) -> CausalSequenceModel:
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN, max_latents=MAX_LATENTS, num_channels=32, num_heads=4,
                  num_self_attention_layers=2, cross_attention_dropout=0.0, init_scale=0.3)
    return CausalSequenceModel(CausalSequenceModelConfig(**{**config, **overrides})).eval()


def prompts(batch: int = 3, length: int = 12, pads=(0, 3, 6), seed: int = 1):
    """Random prompts (B, length) and their left padding mask (None without padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    if not any(pads):
        return ids, None
    mask = torch.arange(length)[None] < torch.tensor(pads)[:, None]
    return ids, mask


def decode_logits(model, ids, num_latents, pad_mask, forced, backend="cpu"):
    """Our logits at prefill and after each forced token (B,) in `forced` (n, B)."""
    decoder = KrassermPerceiverAR(model, backend)
    prefix_len = ids.shape[1] - min(num_latents, ids.shape[1])
    pads = torch.zeros(ids.shape[0], dtype=torch.int64) if pad_mask is None else pad_mask.sum(1)
    with torch.no_grad():
        cache = decoder.new_cache(ids.shape[0], padded=pad_mask is not None)
        seen = [decoder.prefill(cache, ids, prefix_len, pads)]
        seen += [decoder.step(cache, tokens, pads) for tokens in forced]
    return seen


def reference_logits(model, ids, num_latents, pad_mask, forced):
    forward = KrassermCachedForward(model, num_latents, pad_mask)
    with torch.no_grad():
        return [forward.prefill(ids)] + [forward.step(tokens) for tokens in forced]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pads", [(0, 0, 0), (0, 3, 6)])
def test_greedy_equals_recomputation_while_latents_grow(backend, pads):
    """Prompt prefix fixed, latents growing from 2 to max_latents: the cached decode is the whole
    forward recomputed at every step with the prompt's prefix_len."""
    model = build_model()
    ids, mask = prompts(pads=pads)
    new_tokens = MAX_LATENTS - 2
    out = generate(model, ids, max_new_tokens=new_tokens, num_latents=2, pad_mask=mask, backend=backend)
    expected, expected_logits = greedy_reference(model, ids, new_tokens, 2, mask, cached=False)
    assert out.shape == (3, 12 + new_tokens)
    assert torch.equal(out, expected)
    ours = decode_logits(model, ids, 2, mask, out[:, 12:-1].T, backend)
    for step, (a, b) in enumerate(zip(ours, expected_logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("pads", [(0, 0, 0), (0, 3, 6)])
def test_greedy_equals_krasserm_cached_forward_as_prefix_grows_and_window_slides(pads):
    """12-token prompts, 4 latents: latents grow to 8, the prefix grows to 16, then 2 windows' worth
    of positions slide past (the rings wrap): the tokens of krasserm's cached forward under its rule."""
    model = build_model()
    ids, mask = prompts(pads=pads)
    new_tokens = 4 + 8 + 2 * MAX_SEQ_LEN
    out = generate(model, ids, max_new_tokens=new_tokens, num_latents=4, pad_mask=mask)
    expected, _ = greedy_reference(model, ids, new_tokens, 4, mask, cached=True)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("pads", [(0, 0, 0), (2, 5, 0)])
@pytest.mark.parametrize("abs_pos_emb", [True, False])
def test_logits_match_krasserm_cached_forward_on_forced_tokens(pads, abs_pos_emb):
    """Random tokens forced through every regime (greedy tokens of a random model repeat): the
    logits of every step within 1e-4 of krasserm's cached forward, float32."""
    model = build_model(abs_pos_emb=abs_pos_emb, output_norm=True, num_self_attention_rotary_layers=-1)
    ids, mask = prompts(pads=pads, length=10)
    forced = torch.randint(0, VOCAB, (3 * MAX_SEQ_LEN, 3), generator=torch.Generator().manual_seed(2))
    ours = decode_logits(model, ids, 3, mask, forced)
    expected = reference_logits(model, ids, 3, mask, forced)
    for step, (a, b) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_prompt_filling_the_window_and_one_latent():
    """A prompt of max_seq_len - max_latents + 1 tokens with num_latents=1 starts at the largest prefix."""
    model = build_model()
    ids, _ = prompts(pads=(0, 0, 0), length=MAX_SEQ_LEN - MAX_LATENTS + 1)
    out = generate(model, ids, max_new_tokens=20, num_latents=MAX_LATENTS)
    expected, _ = greedy_reference(model, ids, 20, MAX_LATENTS, None, cached=True)
    assert torch.equal(out, expected)


def test_patched_model_generates_the_same_tokens():
    model = build_model()
    ids, mask = prompts()
    before = generate(model, ids, max_new_tokens=10, num_latents=3, pad_mask=mask)
    pf.patch(model)
    assert torch.equal(generate(model, ids, max_new_tokens=10, num_latents=3, pad_mask=mask), before)


def test_patched_backend_is_used(monkeypatch):
    from perceiver_fast.generation import krasserm

    model = build_model()
    pf.patch(model, backend="reference")
    seen = []
    real = krasserm.cross_attention
    monkeypatch.setattr(krasserm, "cross_attention", lambda *a, **k: seen.append(k["backend"]) or real(*a, **k))
    ids, _ = prompts(pads=(0, 0, 0))
    generate(model, ids, max_new_tokens=3)
    assert seen and set(seen) == {"reference"}
    seen.clear()
    generate(model, ids, max_new_tokens=3, backend="cpu")
    assert set(seen) == {"cpu"}


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = build_model()
    ids, mask = prompts()

    def sample(seed, **kw):
        return generate(model, ids, max_new_tokens=12, num_latents=2, pad_mask=mask, do_sample=True,
                        generator=torch.Generator().manual_seed(seed), **kw)

    first = sample(7, temperature=1.5)
    assert torch.equal(first, sample(7, temperature=1.5))
    assert not torch.equal(first, sample(8, temperature=1.5))
    greedy = generate(model, ids, max_new_tokens=12, num_latents=2, pad_mask=mask)
    # one candidate left: sampling is greedy
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(3, top_p=1e-6), greedy)
    torch.manual_seed(5)
    default_generator = generate(model, ids, max_new_tokens=12, do_sample=True)
    torch.manual_seed(5)
    assert torch.equal(generate(model, ids, max_new_tokens=12, do_sample=True), default_generator)


def test_sampled_tokens_stay_in_the_top_k_and_top_p_sets():
    from perceiver_fast.generation import Sampling

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    drawn = Sampling(True, top_k=2, generator=torch.Generator().manual_seed(0)).next_tokens(logits)
    assert set(drawn.tolist()) == {0, 1}
    tied = torch.tensor([[2.0, 2.0, 2.0, 0.0]]).repeat(500, 1)
    drawn = Sampling(True, top_k=1, generator=torch.Generator().manual_seed(0)).next_tokens(tied)
    assert len(set(drawn.tolist())) == 1, "ties with the k-th score must not let more than top_k through"
    p = logits[0].softmax(0)
    # the smallest set reaching 0.8: tokens 0 and 1 hold p0 + p1 = 0.90 > 0.8 > p0 = 0.64
    assert p[0] < 0.8 < p[0] + p[1]
    drawn = Sampling(True, top_p=0.8, generator=torch.Generator().manual_seed(0)).next_tokens(logits)
    assert set(drawn.tolist()) == {0, 1}
    share = (drawn == 0).float().mean()
    assert abs(share - p[0] / (p[0] + p[1])) < 0.05


def test_cache_never_grows_after_it_is_allocated():
    model = build_model()
    ids, mask = prompts()
    decoder = KrassermPerceiverAR(model, None)
    pads = mask.sum(1)
    with torch.no_grad():
        cache = decoder.new_cache(3, padded=True)
        tensors = [t for ring in cache.rings() for t in ring.tensors()]
        layout = [(t.data_ptr(), t.shape, t.stride()) for t in tensors]
        size = cache.nbytes()
        logits = decoder.prefill(cache, ids, 8, pads)
        for _ in range(3 * MAX_SEQ_LEN):  # every ring wraps
            logits = decoder.step(cache, logits.argmax(-1), pads)
    assert [(t.data_ptr(), t.shape, t.stride()) for t in tensors] == layout
    assert cache.nbytes() == size == 2 * 3 * (MAX_SEQ_LEN + 2 * MAX_LATENTS) * 32 * 4 + 3 * MAX_SEQ_LEN
    assert cache.cross.filled == MAX_SEQ_LEN and all(r.filled == MAX_LATENTS for r in cache.latents)


def test_ring_writes_in_place_and_wraps():
    ring = KVRing(1, 4, heads=1, qk_channels=2, v_channels=2, dtype=torch.float32, device=torch.device("cpu"),
                  masked=True)
    values = torch.arange(12.0).reshape(1, 6, 2)
    ring.write(values[:, :3], values[:, :3] + 100, torch.tensor([[False, True, True]]))
    k, v, key_mask = ring.attention_operands()
    assert k.shape == (1, 1, 3, 2) and torch.equal(k[0, 0], values[0, :3]) and key_mask.tolist() == [[0, 1, 1]]
    ring.write(values[:, 3:6], values[:, 3:6] + 100, torch.ones(1, 3, dtype=torch.bool))
    k, v, key_mask = ring.attention_operands()
    # positions 2..5 at slots 2, 3, 0, 1
    assert torch.equal(k[0, 0], values[0, [4, 5, 2, 3]]) and torch.equal(v[0, 0], values[0, [4, 5, 2, 3]] + 100)
    assert key_mask.tolist() == [[1, 1, 1, 1]] and ring.written == 6
    with pytest.raises(ValueError, match="do not fit"):
        ring.write(torch.zeros(1, 5, 2), torch.zeros(1, 5, 2), torch.ones(1, 5, dtype=torch.bool))


def test_no_new_tokens_returns_the_prompt():
    model = build_model()
    ids, _ = prompts(pads=(0, 0, 0))
    out = generate(model, ids, max_new_tokens=0)
    assert torch.equal(out, ids) and out.data_ptr() != ids.data_ptr()


def test_bfloat16_model_generates_close_to_float32():
    model = build_model()
    ids, mask = prompts()
    forced = torch.randint(0, VOCAB, (10, 3), generator=torch.Generator().manual_seed(3))
    full = decode_logits(model, ids, 3, mask, forced)
    half = decode_logits(model.to(torch.bfloat16), ids, 3, mask, forced)
    for a, b in zip(full, half):
        assert b.dtype == torch.bfloat16
        assert (a - b.float()).abs().max() < 0.1 * a.abs().max()


ERRORS = [
    (dict(model=torch.nn.Linear(2, 2)), TypeError, "model must be a krasserm"),
    (dict(input_ids=[[1, 2]]), TypeError, "input_ids must be a tensor"),
    (dict(input_ids=torch.zeros(5, dtype=torch.long)), ValueError, r"input_ids must be \(B, L\)"),
    (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, r"input_ids must be \(B, L\)"),
    (dict(input_ids=torch.zeros(2, 5)), TypeError, "input_ids must hold integer"),
    (dict(input_ids=torch.full((2, 5), VOCAB)), ValueError, "input_ids must be token ids in"),
    (dict(input_ids=torch.zeros(2, MAX_SEQ_LEN + 1, dtype=torch.long)), ValueError, "longer than the model's max_seq_len"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be"),
    (dict(max_new_tokens=2.0), ValueError, "max_new_tokens must be"),
    (dict(num_latents=0), ValueError, r"num_latents must be an int in \[1, max_latents = 8\]"),
    (dict(num_latents=MAX_LATENTS + 1), ValueError, "num_latents must be an int in"),
    (dict(input_ids=torch.zeros(2, MAX_SEQ_LEN, dtype=torch.long), num_latents=2), ValueError,
     r"num_latents=2 leaves a prefix of 22 tokens, more than max_prefix_len \(16\).*\[8, 8\]"),
    (dict(pad_mask=torch.zeros(2, 10)), TypeError, "pad_mask must be a bool"),
    (dict(pad_mask=torch.zeros(2, 9, dtype=torch.bool)), ValueError, "pad_mask must be input_ids' shape"),
    (dict(pad_mask=torch.tensor([[False] * 9 + [True], [False] * 10])), ValueError,
     "pad_mask must be left padding.*row 0"),
    (dict(pad_mask=torch.tensor([[False] * 10, [True] * 10])), ValueError, "pads every position of row 1"),
    (dict(pad_mask=torch.tensor([[False] * 10, [True] * 8 + [False] * 2]), num_latents=3), ValueError,
     "row 1 has 2 tokens, fewer than the prompt's 3 latents"),
    (dict(temperature=0.0, do_sample=True), ValueError, "temperature must be"),
    (dict(temperature=float("nan"), do_sample=True), ValueError, "temperature must be"),
    (dict(top_k=0, do_sample=True), ValueError, "top_k must be"),
    (dict(top_p=1.5, do_sample=True), ValueError, "top_p must be"),
    (dict(top_k=3), ValueError, "apply only with do_sample=True"),
    (dict(do_sample=1), TypeError, "do_sample must be a bool"),
    (dict(do_sample=True, generator=object()), TypeError, "generator must be a torch.Generator"),
    (dict(backend="tpu"), ValueError, "backend must be None or one of"),
]


@pytest.mark.parametrize("overrides,error,message", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_argument_errors_name_the_argument(overrides, error, message):
    model = build_model()
    arguments = dict(model=model, input_ids=torch.zeros(2, 10, dtype=torch.long), max_new_tokens=3)
    arguments.update(overrides)
    model = arguments.pop("model")
    input_ids = arguments.pop("input_ids")
    with pytest.raises(error, match=message):
        generate(model, input_ids, **arguments)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_on_another_device_is_refused():
    with pytest.raises(ValueError, match="generator must be on the model's device"):
        generate(build_model(), torch.zeros(2, 10, dtype=torch.long), max_new_tokens=2, do_sample=True,
                 generator=torch.Generator("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", None])
def test_greedy_on_cuda_equals_the_cpu(backend):
    model = build_model()
    ids, mask = prompts()
    new_tokens = 4 + 8 + MAX_SEQ_LEN
    expected = generate(model, ids, max_new_tokens=new_tokens, num_latents=4, pad_mask=mask)
    out = generate(model.cuda(), ids.cuda(), max_new_tokens=new_tokens, num_latents=4, pad_mask=mask.cuda(),
                   backend=backend)
    assert torch.equal(out.cpu(), expected)

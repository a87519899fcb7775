"""Generation level: Perceiver AR decode steps of a krasserm `CausalSequenceModel` (random weights)
after a prompt of M tokens with N latents (num_latents = max_latents = N), B prompts. Each call
generates the case's new_tokens greedily, going on from where the last call stopped (its ms are per
token; the prompt's forward is not timed): krasserm's own cached forward under its generate's cache
rule, against `perceiver_fast.generation` over the preallocated cache. The model's max_seq_len
leaves room for ROOM new tokens after the prompt: the prefix grows by one position per token, and
nothing slides in a run's few calls."""

from __future__ import annotations

import torch

from .cases import Case
from .providers import Provider, missing_module

LATENT_LAYERS = 8
ROOM = 1024
VOCAB = 262  # krasserm's default: UTF-8 bytes and special tokens


def build_model(case: Case, dtype: torch.dtype, device: str):
    from perceiver.model.core.config import CausalSequenceModelConfig
    from perceiver.model.core.modules import CausalSequenceModel

    config = CausalSequenceModelConfig(vocab_size=VOCAB, max_seq_len=case.M + ROOM, max_latents=case.N,
                                       num_channels=case.C, num_heads=case.H,
                                       num_self_attention_layers=LATENT_LAYERS, cross_attention_dropout=0.0)
    return CausalSequenceModel(config).to(device, dtype).eval()


def decode_read_bytes(case: Case, dtype: torch.dtype) -> int:
    """What one decode step must read at least, in the middle of the timed tokens: every weight
    matrix but the position table (one row of it), the token table once (the tied output head), the
    cross-attention cache over the positions so far and each latent layer's cache over N latents."""
    size = torch.finfo(dtype).bits // 8
    c = case.C
    # q, k, v, o and an MLP of widening 4 (2 x 4 c^2) per attention layer; LayerNorms are negligible
    weights = (1 + LATENT_LAYERS) * (4 * c * c + 8 * c * c) + VOCAB * c
    positions = case.M + case.new_tokens // 2
    caches = case.B * 2 * c * (positions + LATENT_LAYERS * case.N)
    return (weights + caches) * size


def cache_bytes(case: Case, dtype: torch.dtype) -> int:
    """The K/V cache a step reads, after the prompt and one call's tokens (the cross-attention's
    positions, N latents per latent layer): what krasserm's cache holds then; pf.generation's is
    preallocated for max_seq_len = M + ROOM positions."""
    size = torch.finfo(dtype).bits // 8
    return case.B * 2 * case.C * (case.M + case.new_tokens + LATENT_LAYERS * case.N) * size


def _refusal(case: Case, dtype, device) -> str | None:
    return missing_module("perceiver") or (None if case.level == "generation" else "generation level only")


def _prompt(case: Case, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (case.B, case.M), generator=generator).to(device)


def _generating(step, first_logits: torch.Tensor, tokens: int):
    """One call: `tokens` greedy steps, from the logits the last call (or the prompt) left."""
    last = [first_logits]

    def call():
        with torch.no_grad():
            for _ in range(tokens):
                last[0] = step(last[0].argmax(dim=-1))
        return last[0]
    return call


def _prepare_krasserm(case: Case, dtype, device, backward):
    from ..generation.reference import KrassermCachedForward

    model = build_model(case, dtype, device)
    forward = KrassermCachedForward(model, case.N, None)
    with torch.no_grad():
        logits = forward.prefill(_prompt(case, device))
    return _generating(forward.step, logits, case.new_tokens)


def _prepare_ours(case: Case, dtype, device, backward, patched: bool = False):
    from ..generation import KrassermPerceiverAR

    model = build_model(case, dtype, device)
    if patched:  # its linear layers (one row per step) on pf.linear, the MLPs' GELU fused
        import perceiver_fast as pf

        pf.patch(model)
    decoder = KrassermPerceiverAR(model, None)
    pads = torch.zeros(case.B, dtype=torch.int64, device=device)
    cache = decoder.new_cache(case.B, padded=False)
    with torch.no_grad():
        logits = decoder.prefill(cache, _prompt(case, device), case.M - case.N, pads)
    return _generating(lambda tokens: decoder.step(cache, tokens, pads), logits, case.new_tokens)


def generation_providers() -> list[Provider]:
    return [Provider("pf.generation", "generation", _refusal, _prepare_ours),
            Provider("pf.generation + pf.patch", "generation", _refusal,
                     lambda case, dtype, device, backward: _prepare_ours(case, dtype, device, backward, patched=True)),
            Provider("krasserm cached forward", "generation", _refusal, _prepare_krasserm)]

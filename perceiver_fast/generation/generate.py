"""`generate`: Perceiver AR token generation over a preallocated cache (docs/generation.md)."""

from __future__ import annotations

import torch

from ..arguments import type_name
from ..dispatch import BACKEND_NAMES
from .krasserm import KrassermPerceiverAR, causal_sequence_model_class
from .sampling import Sampling


def generate(model: torch.nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int, num_latents: int = 1,
             pad_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             backend: str | None = None) -> torch.Tensor:
    """The prompts input_ids (B, L) followed by max_new_tokens new tokens each: (B, L + max_new_tokens).

    model: a krasserm perceiver-io `CausalSequenceModel` (Perceiver AR), patched by `pf.patch` or
    not: generation reads the model's layers and runs its own decode path either way. The prompt's
    forward (prefill) uses the fused causal kernels; each new token is one query per attention
    against the cache. It runs as in eval mode (no dropout) and without gradients.

    num_latents: the prompt's last positions that are latents at first (krasserm's `generate`);
    min(num_latents, L) are. Latents then grow by one per token up to the model's max_latents, then
    the prefix grows by one per token up to max_prefix_len = max_seq_len - max_latents, then the
    window slides: the oldest position leaves. The prompt's prefix, L - num_latents, must be at most
    max_prefix_len.

    pad_mask: bool (B, L), True at padding; left padding only (every row's pads come first), no row
    all padding, and no padding among the prompt's latents (num_latents at most each row's tokens).

    do_sample, temperature, top_k, top_p, generator: `Sampling`. backend: as in
    `pf.cross_attention`; None takes the backend `pf.patch` set on the model, else auto.
    """
    decoder = KrassermPerceiverAR(_checked_model(model), _backend_of(model, backend))
    device = decoder.parameter.device
    input_ids = _checked_input_ids(input_ids, decoder, device)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    batch, length = input_ids.shape
    prefix_len = length - _checked_num_latents(num_latents, length, decoder)
    pads = _checked_pad_mask(pad_mask, input_ids, prefix_len)
    sampling = Sampling(do_sample, temperature, top_k, top_p, generator)
    sampling.check(model.input_adapter.vocab_size, device)
    if max_new_tokens == 0:
        return input_ids.clone()
    new = torch.empty(batch, max_new_tokens, dtype=input_ids.dtype, device=device)
    with torch.no_grad():
        cache = decoder.new_cache(batch, padded=bool(pads.any()))
        logits = decoder.prefill(cache, input_ids, prefix_len, pads)
        for step in range(max_new_tokens):
            new[:, step] = sampling.next_tokens(logits)
            if step + 1 < max_new_tokens:
                logits = decoder.step(cache, new[:, step], pads)
    return torch.cat([input_ids, new], dim=1)


def _checked_model(model):
    model_class = causal_sequence_model_class()
    if model_class is None:
        raise TypeError("model: generate runs krasserm perceiver-io's CausalSequenceModel, and perceiver-io "
                        "is not installed (pip install perceiver-io)")
    if not isinstance(model, model_class):
        raise TypeError(f"model must be a krasserm perceiver-io CausalSequenceModel (Perceiver AR), got "
                        f"{type_name(model)}")
    return model


def _backend_of(model, backend):
    if backend is not None:
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be None or one of {BACKEND_NAMES}, got {backend!r}")
        return backend
    chosen = {m.pf_backend for m in model.modules() if hasattr(m, "pf_backend")}
    return chosen.pop() if len(chosen) == 1 else None


def _checked_input_ids(input_ids, decoder, device):
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids (B, L), got {type_name(input_ids)}")
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be (B, L) with B, L >= 1, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.device != device:
        raise ValueError(f"input_ids must be on the model's device {device}, got {input_ids.device}")
    vocab = decoder.adapter.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids must be token ids in [0, {vocab}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    if input_ids.shape[1] > decoder.max_seq_len:
        raise ValueError(f"input_ids: a prompt of {input_ids.shape[1]} tokens is longer than the model's "
                         f"max_seq_len ({decoder.max_seq_len})")
    return input_ids.long()


def _checked_num_latents(num_latents, length, decoder) -> int:
    """The prompt's latents, min(num_latents, length), after checking num_latents."""
    if isinstance(num_latents, bool) or not isinstance(num_latents, int) \
            or not 1 <= num_latents <= decoder.max_latents:
        raise ValueError(f"num_latents must be an int in [1, max_latents = {decoder.max_latents}], got "
                         f"{num_latents!r}")
    latents = min(num_latents, length)
    max_prefix_len = decoder.max_seq_len - decoder.max_latents
    if length - latents > max_prefix_len:
        raise ValueError(f"num_latents={num_latents} leaves a prefix of {length - latents} tokens, more than "
                         f"max_prefix_len ({max_prefix_len}); for a prompt of {length} tokens num_latents must "
                         f"be in [{length - max_prefix_len}, {decoder.max_latents}]")
    return latents


def _checked_pad_mask(pad_mask, input_ids, prefix_len) -> torch.Tensor:
    """Pads per row (B,) int64, after checking pad_mask."""
    batch, length = input_ids.shape
    if pad_mask is None:
        return torch.zeros(batch, dtype=torch.int64, device=input_ids.device)
    if not isinstance(pad_mask, torch.Tensor) or pad_mask.dtype != torch.bool:
        raise TypeError(f"pad_mask must be a bool tensor (True = padding), got "
                        f"{pad_mask.dtype if isinstance(pad_mask, torch.Tensor) else type_name(pad_mask)}")
    if pad_mask.shape != input_ids.shape or pad_mask.device != input_ids.device:
        raise ValueError(f"pad_mask must be input_ids' shape {tuple(input_ids.shape)} on {input_ids.device}, "
                         f"got {tuple(pad_mask.shape)} on {pad_mask.device}")
    after_token = pad_mask[:, 1:] & ~pad_mask[:, :-1]
    if bool(after_token.any()):
        row = int(after_token.any(dim=1).nonzero()[0])
        raise ValueError(f"pad_mask must be left padding (each row's pads first), but row {row} has padding "
                         f"after a token")
    pads = pad_mask.sum(dim=1)
    if bool((pads == length).any()):
        raise ValueError(f"pad_mask pads every position of row {int((pads == length).nonzero()[0])}")
    if bool((pads > prefix_len).any()):
        row = int((pads > prefix_len).nonzero()[0])
        raise ValueError(f"pad_mask: row {row} has {length - int(pads[row])} tokens, fewer than the prompt's "
                         f"{length - prefix_len} latents; num_latents must be at most every row's token count")
    return pads

"""What generation is checked and measured against: krasserm's own cached forward
(`CausalSequenceModel.forward(..., kv_cache=...)`, torch.cat into its cache and rotary over every
cached key at every step) driven by the cache rule of krasserm's `generate` (its HF wrapper, which
does not run on transformers 5), and a cache-free recomputation of the whole forward per token."""

from __future__ import annotations

import torch


class KrassermCachedForward:
    """Stepping through krasserm's cached forward: `prefill` the prompt, then `step` with each
    new token, the rule of krasserm's `prepare_inputs_for_generation` applied before each step:
    - latents grow to max_latents, then the prefix grows by one per token (prefix_len + 1) and the
      self-attention caches keep the last max_latents - 1 latents;
    - past max_seq_len, the cross-attention cache keeps the last max_seq_len - 1 positions and the
      padding mask the last max_seq_len."""

    def __init__(self, model: torch.nn.Module, num_latents: int, pad_mask: torch.Tensor | None):
        self.model, self.num_latents, self.pad_mask = model, num_latents, pad_mask

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.length = input_ids.shape[1]
        self.prefix_len = self.length - min(self.num_latents, self.length)
        self.mask = self.pad_mask
        output = self.model(input_ids, prefix_len=self.prefix_len, pad_mask=self.mask, kv_cache=[])
        self.kv_cache = output.kv_cache
        return output.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        self.length += 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_zeros(self.mask.shape[0], 1)], dim=1)
        cross, *latent = self.kv_cache
        if self.length - self.prefix_len > model.max_latents:
            self.prefix_len = min(self.prefix_len + 1, model.max_prefix_len)
            latent = [(k[:, -(model.max_latents - 1):], v[:, -(model.max_latents - 1):]) for k, v in latent]
        if self.length > model.max_seq_len:
            cross = tuple(t[:, -(model.max_seq_len - 1):] for t in cross)
        mask = None if self.mask is None else self.mask[:, -model.max_seq_len:]
        output = model(tokens[:, None], prefix_len=self.prefix_len, pad_mask=mask, kv_cache=[cross, *latent])
        self.kv_cache = output.kv_cache
        return output.logits[:, -1]


def recomputed_logits(model: torch.nn.Module, tokens: torch.Tensor, prefix_len: int,
                      pad_mask: torch.Tensor | None) -> torch.Tensor:
    """The next token's logits (B, vocab) from krasserm's whole forward over tokens (B, n), no cache."""
    return model(tokens, prefix_len=prefix_len, pad_mask=pad_mask).logits[:, -1]


def greedy_reference(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, num_latents: int,
                     pad_mask: torch.Tensor | None = None, cached: bool = True):
    """(tokens (B, L + max_new_tokens), the logits of every step) of greedy generation by krasserm's
    cached forward under its generate's rule (cached=True), or by recomputing the whole forward with the
    prompt's prefix_len at every step (cached=False: defined the same while latents grow, up to
    max_latents)."""
    tokens, logits_seen = input_ids, []
    with torch.no_grad():
        if cached:
            forward = KrassermCachedForward(model, num_latents, pad_mask)
            logits = forward.prefill(input_ids)
        else:
            prefix_len = input_ids.shape[1] - min(num_latents, input_ids.shape[1])
            mask = pad_mask
            logits = recomputed_logits(model, tokens, prefix_len, mask)
        for step in range(max_new_tokens):
            logits_seen.append(logits)
            new = logits.argmax(dim=-1)
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            if step + 1 == max_new_tokens:
                break
            if cached:
                logits = forward.step(new)
            else:
                mask = None if mask is None else torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)
                logits = recomputed_logits(model, tokens, prefix_len, mask)
    return tokens, logits_seen

"""The decode cache of Perceiver AR generation: keys and values preallocated once, written in place.

Each attention's cache is a ring of `capacity` positions: position t goes to slot t % capacity, so
the oldest position leaves when a new one arrives and nothing is ever copied or reallocated.
Attention over the cache is order-free (rotary is applied when a key is written, and a decode
query sees every cached key), so the ring's slots need no reordering.
"""

from __future__ import annotations

import torch


class KVRing:
    """K and V of the last `capacity` positions of one attention, head-major: (B, heads, capacity,
    dim) each, so that each head's keys are one contiguous block (a decode step streams them;
    keys a head's width apart read 3x slower on the CPU). When `masked`, a bool (B, capacity) key
    mask too (True = the key may be attended)."""

    def __init__(self, batch: int, capacity: int, heads: int, qk_channels: int, v_channels: int,
                 dtype: torch.dtype, device: torch.device, masked: bool):
        self.heads = heads
        self.k = torch.zeros(batch, heads, capacity, qk_channels // heads, dtype=dtype, device=device)
        self.v = torch.zeros(batch, heads, capacity, v_channels // heads, dtype=dtype, device=device)
        self.key_mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device) if masked else None
        self.written = 0  # positions written since the start; the ring holds the last `capacity` of them

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def filled(self) -> int:
        return min(self.written, self.capacity)

    def write(self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> None:
        """Appends n positions: k (B, n, qk_channels), v (B, n, v_channels), key_mask (B, n) when masked."""
        n = k.shape[1]
        k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (k, v))  # (B, H, n, dim)
        if n > self.capacity:
            raise ValueError(f"{n} positions do not fit a cache of {self.capacity}")
        start = self.written % self.capacity
        first = min(n, self.capacity - start)  # up to the ring's end, the rest from slot 0
        for source, target in ((0, start), (first, 0)):
            count = first if source == 0 else n - first
            if count == 0:
                continue
            self.k[:, :, target:target + count].copy_(k[:, :, source:source + count])
            self.v[:, :, target:target + count].copy_(v[:, :, source:source + count])
            if self.key_mask is not None:
                self.key_mask[:, target:target + count].copy_(key_mask[:, source:source + count])
        self.written += n

    def attention_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(k (B, H, n, Dqk), v (B, H, n, Dv), key_mask (B, n) or None) over the filled slots: views, no copy."""
        n = self.filled
        return self.k[:, :, :n], self.v[:, :, :n], None if self.key_mask is None else self.key_mask[:, :n]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.key_mask) if t is not None]


class DecodeCache:
    """Every cache of one Perceiver AR generation: the cross-attention's over the last `max_seq_len`
    positions (prefix and latents), with a key mask when the prompts are padded, and one per latent
    self-attention layer over the last `max_latents` latents."""

    def __init__(self, batch: int, max_seq_len: int, max_latents: int, self_attention_layers: int, heads: int,
                 cross_channels: tuple[int, int], latent_channels: tuple[int, int], dtype: torch.dtype,
                 device: torch.device, padded: bool):
        self.cross = KVRing(batch, max_seq_len, heads, *cross_channels, dtype, device, masked=padded)
        self.latents = [KVRing(batch, max_latents, heads, *latent_channels, dtype, device, masked=False)
                        for _ in range(self_attention_layers)]

    def rings(self) -> list[KVRing]:
        return [self.cross, *self.latents]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ring in self.rings() for t in ring.tensors())

"""The next token from a step's logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..arguments import type_name


@dataclass(frozen=True)
class Sampling:
    """How each new token is chosen. do_sample False: the most likely token (the first of equals).
    True: drawn from softmax(logits / temperature), restricted to the top_k most likely tokens
    and then to the smallest set whose probability reaches top_p, by `generator` (torch's default
    generator of the logits' device when None)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def check(self, vocab_size: int, device: torch.device) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or not 1 <= self.top_k):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {self.top_p!r}")
        if self.generator is not None:
            if not isinstance(self.generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type_name(self.generator)}")
            if self.generator.device.type != device.type:
                raise ValueError(f"generator must be on the model's device ({device.type}), got one on "
                                 f"{self.generator.device.type}")
        if not self.do_sample and (self.temperature != 1.0 or self.top_k is not None or self.top_p is not None):
            raise ValueError("temperature, top_k and top_p apply only with do_sample=True (greedy decoding "
                             "ignores them)")

    def next_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """The chosen token of each row of logits (B, vocab): (B,) int64."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            # by index, so that ties with the k-th score do not let more than top_k through
            kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(self.top_k, dim=-1).indices, True)
            scores = scores.masked_fill(~kept, -math.inf)
        if self.top_p is not None and self.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            probabilities = ordered.softmax(dim=-1)
            # a token stays while the tokens more likely than it sum to less than top_p: the first always does
            dropped_in_order = probabilities.cumsum(dim=-1) - probabilities >= self.top_p
            dropped = torch.empty_like(dropped_in_order).scatter_(-1, order, dropped_in_order)
            scores = scores.masked_fill(dropped, -math.inf)
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=self.generator)[:, 0]

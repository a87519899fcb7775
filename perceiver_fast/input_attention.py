"""The public fused input attention: the input side of a Perceiver cross-attention layer as one op
(LayerNorm and the K/V projections inside the kernel; the methods: backends/input_methods.py)."""

from __future__ import annotations

import torch

from .dispatch import run_sharded, select_backend
from .validation import validate_input_attention


def fused_input_attention(q: torch.Tensor, x: torch.Tensor, *, k_weight: torch.Tensor,
                          k_bias: torch.Tensor | None = None, v_weight: torch.Tensor,
                          v_bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                          norm_bias: torch.Tensor | None = None, norm_eps: float | None = 1e-5,
                          key_mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                          method: str = "auto", dropout_p: float = 0.0, backend: str | None = None,
                          process_group=None) -> torch.Tensor:
    """Attention of projected queries over LayerNorm(x) projected to K and V, fused.

    q (B, H, N, Dqk); x (B, M, C); k_weight (H * Dqk, C), v_weight (H * Dv, C) and optional
    biases as in nn.Linear; norm_weight, norm_bias (C,) and norm_eps those of the input's
    nn.LayerNorm (norm_eps=None: no LayerNorm). key_mask bool (B, M) True = attend; causal
    bottom-right aligned; scale defaults to 1/sqrt(Dqk). Returns (B, H, N, Dv); a query with no
    key to attend gives 0. Runs in autocast's dtype where autocast is on, else in the promoted
    dtype of the inputs.

    method: "auto" (fewer FLOPs), "shortcut" or "projection". backend: as in `cross_attention`.
    Auto takes the first backend that fuses the method (the C++ and Triton ones fuse both),
    else runs it composed on the best attention backend: LayerNorm, K and V made in
    torch, then fused attention. A named backend runs it fused where it fuses the method, else
    composed on its own attention kernel, and raises BackendUnsupportedError when it can do
    neither. `pf.explain(pf.fused_input_attention, ...)` says which.

    dropout_p: attention dropout on the scores of q's heads, as in `cross_attention`. The shortcut
    adds V's bias once per row, exact only while a row's probabilities sum to 1, so with dropout
    and a bias on V (v_bias, or norm_bias through Wv) "auto" takes the projection and "shortcut" is
    refused.

    process_group: as in `cross_attention`, with x and key_mask the sharded key side. q and every
    weight and bias are replicated: their gradients are the full ones on every rank, x's is this
    shard's. Method "auto" counts every rank's keys, so every rank picks the same method.
    """
    if process_group is not None:
        return run_sharded(validate_input_attention, backend, q, x, k_weight=k_weight, k_bias=k_bias,
                           v_weight=v_weight, v_bias=v_bias, norm_weight=norm_weight, norm_bias=norm_bias,
                           norm_eps=norm_eps, key_mask=key_mask, causal=causal, scale=scale, method=method,
                           dropout_p=dropout_p, process_group=process_group)[0]
    problem = validate_input_attention(q, x, k_weight=k_weight, k_bias=k_bias, v_weight=v_weight, v_bias=v_bias,
                                       norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps,
                                       key_mask=key_mask, causal=causal, scale=scale, method=method,
                                       dropout_p=dropout_p)
    with torch.autocast(problem.device.type, enabled=False):
        out, _ = select_backend(problem, backend).run(problem)
    return out

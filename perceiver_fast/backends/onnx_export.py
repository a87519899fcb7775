"""The "onnx" backend: every op as the standard operators an ONNX file can hold, which is what dispatch
runs while `torch.onnx.export` traces a model (either exporter; perceiver_fast/dispatch.py).

An ONNX runtime cannot call this library's kernels, so the file gets the ops' contract in plain
torch ops that the exporters translate one to one:
  attention        F.scaled_dot_product_attention (opset 23's Attention operator under the dynamo
                   exporter, MatMul/Softmax under the TorchScript one), the key mask and
                   bottom-right causal as one boolean mask, and rows with no key set to 0 by a Where;
  input attention  LayerNorm, the two projections (MatMul/Gemm) and that attention (it fuses nothing);
  linear           MatMul/Gemm, the GELU and the residual Add.
It runs eagerly too (backend="onnx"), on any device torch runs these ops on, which is how the tests
check it against the reference. Inference only: no dropout, no gradients through the lse.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..reference import allowed_keys, linear_reference
from ..validation import AttentionProblem, LinearProblem
from .base import Backend
from .reference import ReferenceBackend


class OnnxExportBackend(Backend):
    name = "onnx"
    # The reference's: every device and dtype, less dropout (an ONNX file has no dropout of ours).
    capabilities = replace(ReferenceBackend.capabilities, dropout=False)
    linear = ReferenceBackend.linear

    def extra_refusals(self, problem, explicit: bool) -> list[str]:
        if problem.shards is not None:
            return ["a call with a process_group is a collective, which an ONNX file cannot hold"]
        return []

    def run_attention(self, problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
        p = problem
        allowed = allowed_keys(p.batch, p.queries, p.keys, p.key_mask, p.causal, p.device)
        # Causal as a mask, never SDPA's flag: that is top-left aligned, and a traced N == M test would
        # tie an export to its example's sizes. ONNX Runtime's Attention operator takes a mask with a
        # row per query, never broadcast over them.
        mask = None if allowed is None else allowed.expand(p.batch, 1, p.queries, p.keys)
        out = F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=mask, scale=p.scale)
        scores = torch.matmul(p.q.float(), p.k.float().transpose(-1, -2)) * p.scale
        if allowed is not None:
            # A row with no key has output 0 (SDPA gives NaN there) and lse -inf.
            scores = scores.masked_fill(~allowed, float("-inf"))
            out = torch.where(allowed.any(dim=-1, keepdim=True), out, torch.zeros((), dtype=out.dtype,
                                                                                  device=out.device))
        # Exporters drop this second product of q and k wherever the caller leaves the lse unused.
        return out, torch.logsumexp(scores, dim=-1)

    def run_linear(self, problem: LinearProblem) -> torch.Tensor:
        p = problem
        return linear_reference(p.x, p.weight, p.bias, activation=p.activation, residual=p.residual)

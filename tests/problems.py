"""One problem of any public op (cross, latent or fused input attention): its inputs, a run on a named
backend, and the same call on the plain-PyTorch reference in any dtype (float64: the truth). The
non-finite regression tests and the property suite build on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import perceiver_fast as pf
from perceiver_fast.reference import allowed_keys, attention_reference, input_attention_reference

from checks import forced_cpu_path

OPS = ("cross", "latent", "input")


@dataclass
class Problem:
    op: str
    inputs: dict[str, torch.Tensor]  # the differentiable ones, by argument name
    key_mask: torch.Tensor | None = None
    causal: bool = False
    scale: float | None = None
    norm_eps: float | None = 1e-5  # the input op's LayerNorm (None: none)
    options: dict = field(default_factory=dict)

    @property
    def key_side(self) -> tuple[str, ...]:
        """The inputs whose rows are keys (dim -2 for k and v, dim 1 for x)."""
        return ("x",) if self.op == "input" else ("k", "v")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, N, M)."""
        B, H, N, _ = self.inputs["q"].shape
        keys = self.inputs["x"].shape[1] if self.op == "input" else self.inputs["k"].shape[2]
        return B, H, N, keys

    def allowed(self) -> torch.Tensor:
        """Bool (B, 1 or H, N, M): True where query i may attend key j."""
        B, _, N, M = self.shape
        allowed = allowed_keys(B, N, M, self.key_mask, self.causal, torch.device("cpu"))
        return torch.ones(1, 1, N, M, dtype=torch.bool) if allowed is None else allowed

    def keys_and_values(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """k (B, H, M, Dqk) and v (B, H, M, Dv) in dtype: the input op's as its reference projects them."""
        t = {name: x.detach().to(dtype) for name, x in self.inputs.items()}
        if self.op != "input":
            return t["k"], t["v"]
        x = t["x"]
        if self.norm_eps is not None:
            x = torch.nn.functional.layer_norm(x, x.shape[-1:], t.get("norm_weight"), t.get("norm_bias"),
                                               self.norm_eps)
        B, M, _ = x.shape
        H = t["q"].shape[1]
        k = torch.nn.functional.linear(x, t["k_weight"], t.get("k_bias")).view(B, M, H, -1).transpose(1, 2)
        v = torch.nn.functional.linear(x, t["v_weight"], t.get("v_bias")).view(B, M, H, -1).transpose(1, 2)
        return k, v

    def run(self, backend: tuple[str, str | None], inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        kernel, path = backend
        t = self.inputs if inputs is None else inputs
        with forced_cpu_path(path or "native"):
            if self.op == "input":
                return pf.fused_input_attention(
                    t["q"], t["x"], k_weight=t["k_weight"], k_bias=t.get("k_bias"), v_weight=t["v_weight"],
                    v_bias=t.get("v_bias"), norm_weight=t.get("norm_weight"), norm_bias=t.get("norm_bias"),
                    norm_eps=self.norm_eps, key_mask=self.key_mask, causal=self.causal, scale=self.scale,
                    backend=kernel, **self.options)
            if self.op == "latent":
                return pf.latent_attention(t["q"], t["k"], t["v"], causal=self.causal, scale=self.scale,
                                           backend=kernel)
            return pf.cross_attention(t["q"], t["k"], t["v"], key_mask=self.key_mask, causal=self.causal,
                                      scale=self.scale, backend=kernel)

    def reference(self, dtype: torch.dtype, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The plain-PyTorch result computed in `dtype`, from the inputs cast to it (as leaves' views,
        so gradients reach `inputs`)."""
        t = {name: x.to(dtype) for name, x in (self.inputs if inputs is None else inputs).items()}
        if self.op == "input":
            return input_attention_reference(
                t["q"], t["x"], k_weight=t["k_weight"], k_bias=t.get("k_bias"), v_weight=t["v_weight"],
                v_bias=t.get("v_bias"), norm_weight=t.get("norm_weight"), norm_bias=t.get("norm_bias"),
                norm_eps=self.norm_eps, key_mask=self.key_mask, causal=self.causal, scale=self.scale)
        return attention_reference(t["q"], t["k"], t["v"], key_mask=self.key_mask, causal=self.causal,
                                   scale=self.scale)[0]


def output_rounding_bound(problem: Problem) -> float:
    """How far a float32 kernel's output may be from float64's through its scores alone: a float32
    score of d terms (the input op's keys projected over C channels first) may be off by
    (d + C) x 2^-24 x scale x sum |q_d k_d|, and a score error e moves the output by up to
    min(2, 2e) x max |v|. Near-tied keys at huge scales take all of it."""
    k, v = problem.keys_and_values(torch.float64)
    q = problem.inputs["q"].detach().double()
    terms = q.shape[-1] + (problem.inputs["x"].shape[-1] if problem.op == "input" else 0)
    scale = problem.scale if problem.scale is not None else q.shape[-1] ** -0.5
    score_error = scale * terms * torch.finfo(torch.float32).eps * (q.abs() @ k.abs().transpose(-1, -2)).max().item()
    return min(2.0, 2 * score_error) * v.abs().max().item()


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, magnitude: float = 1.0, layout: str = "contiguous"
                ) -> torch.Tensor:
    """Random normal values times magnitude. layout "heads-inner": a (B, H, L, D) tensor held as
    (B, L, H, D), as HF and lucidrains hold heads; "strided": every other element of the last dimension."""
    if layout == "heads-inner" and len(shape) == 4:
        B, H, L, D = shape
        return (torch.randn(B, L, H, D, dtype=torch.float64) * magnitude).to(dtype).transpose(1, 2)
    if layout == "strided":
        wide = (torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64) * magnitude).to(dtype)
        return wide[..., ::2]
    return (torch.randn(*shape, dtype=torch.float64) * magnitude).to(dtype)


def make_problem(op: str, B: int, H: int, N: int, M: int, dqk: int, dv: int, dtype: torch.dtype, *,
                 channels: int = 8, key_mask: torch.Tensor | None = None, causal: bool = False,
                 scale: float | None = None, magnitude: float = 1.0, layout: str = "contiguous",
                 biases: bool = True, norm: bool = True) -> Problem:
    """A random problem; for "latent" M is N and key_mask must be None."""
    if op == "latent":
        M = N
    q = make_tensor((B, H, N, dqk), dtype, magnitude, layout)
    if op == "input":
        inputs = {"q": q, "x": make_tensor((B, M, channels), dtype, magnitude, layout),
                  "k_weight": make_tensor((H * dqk, channels), dtype, channels ** -0.5),
                  "v_weight": make_tensor((H * dv, channels), dtype, channels ** -0.5)}
        if biases:
            inputs.update(k_bias=make_tensor((H * dqk,), dtype), v_bias=make_tensor((H * dv,), dtype))
        if norm:
            inputs.update(norm_weight=1 + 0.1 * make_tensor((channels,), dtype),
                          norm_bias=0.1 * make_tensor((channels,), dtype))
    else:
        inputs = {"q": q, "k": make_tensor((B, H, M, dqk), dtype, magnitude, layout),
                  "v": make_tensor((B, H, M, dv), dtype, 1.0, layout)}
    inputs = {name: t.requires_grad_() for name, t in inputs.items()}
    return Problem(op, inputs, key_mask, causal, scale, 1e-5 if norm else None)


def output_with_gradients(problem: Problem, result: torch.Tensor, dout: torch.Tensor,
                          inputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{"out": result, "d<name>": gradient of (result * dout).sum() for every input}."""
    leaves = problem.inputs if inputs is None else inputs
    grads = torch.autograd.grad(result, list(leaves.values()), dout.to(result.dtype), allow_unused=True)
    return {"out": result.detach(), **{f"d{name}": (torch.zeros_like(t) if g is None else g)
                                       for (name, t), g in zip(leaves.items(), grads)}}

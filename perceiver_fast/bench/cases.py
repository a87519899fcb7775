"""Benchmark cases: the published Perceiver shapes (perceiver_fast/shapes.json), at op level
(cross_attention, latent_attention), layer level (a full cross-attention or latent self-attention
layer) and model level (a whole named Perceiver), with input-length sweeps for the plots; and the
FLOP count every report rate uses."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from importlib import resources

import torch

from ..flops import visible_pairs
from ..profiler.models import NAMED_MODELS

PASSES = ("forward", "forward+backward")
# The generation level's one pass: new tokens, one decode step each, after the prompt's forward.
DECODE = "decode"
# FLOPs of each pass per forward FLOP, FlashAttention's convention: the backward's five matmuls
# (the scores recomputed, dP, dV, dQ, dK) are 2.5x the forward's two.
PASS_FLOP_FACTOR = {"forward": 1.0, "forward+backward": 3.5}


@dataclass(frozen=True)
class Case:
    """One problem. level "op": q, k, v given; "layer": a full layer with LayerNorms and projections;
    "model": a whole named model (perceiver_fast.profiler.models), `name` naming it.

    kind: "cross", "causal" (bottom-right, Perceiver AR) or "latent" (N == M). C is the input's
    channels (layer level, cross); latent_dim the latents' width (layer level). At model level the
    dims are those of the model's input cross-attention. padded_inputs: inputs at the end of every
    item masked out as padding (model level). `scaled` says how the published shape was reduced to
    fit the run, empty when it was not. ranks: processes the input is sharded over along M (the
    "sharded" level; gloo on the CPU); threads: torch threads per process (0: torch's default).
    dropout: the attention dropout of a layer or model run in training mode (0: eval mode).
    "generation": Perceiver AR decoding after a prompt of M tokens with N latents, H heads of dqk
    channels, C channels; new_tokens per timed call, and its times are per new token.
    """

    name: str
    level: str
    kind: str
    B: int
    H: int
    N: int
    M: int
    dqk: int
    dv: int
    C: int = 0
    latent_dim: int = 0
    padded_inputs: int = 0
    ranks: int = 1
    threads: int = 0
    dropout: float = 0.0
    new_tokens: int = 0
    calls: int = 1  # calls per timed run: a tiny case times a loop, so the clock's resolution does not count
    scaled: str = ""
    sweep: str = field(default="", compare=False)  # cases of one sweep differ only in M

    @property
    def causal(self) -> bool:
        return self.kind == "causal"

    def attention_flops(self, pass_name: str) -> float | None:
        """The FLOPs every rate of this case counts, the same for every provider: the attention's
        matmuls, 2 B H P (dqk + dv) forward with P the scored query-key pairs, times PASS_FLOP_FACTOR.
        Layers: the attention only, not the projections. Model level: None, not counted (the
        attention is a small part of a whole model's work)."""
        if self.level in ("model", "generation"):
            return None
        pairs = visible_pairs(self.N, self.M, self.causal)
        return 2 * self.B * self.H * pairs * (self.dqk + self.dv) * PASS_FLOP_FACTOR[pass_name]

    def label(self) -> str:
        if self.level == "model":
            dims = f"B={self.B} M={self.M}"  # the model's configuration fixes the rest
        elif self.level == "generation":
            return (f"{self.name} (B={self.B}, prompt of {self.M} tokens, {self.N} latents, H={self.H} C={self.C}, "
                    f"{self.new_tokens} new tokens)")
        else:
            dims = f"B={self.B} H={self.H} N={self.N} M={self.M} D={self.dqk}" + (
                f"/{self.dv}" if self.dv != self.dqk else "")
        notes = (", causal" if self.causal else "") + (
            f", last {self.padded_inputs} inputs masked as padding" if self.padded_inputs else "") + (
            f", {self.ranks} process{'es' if self.ranks > 1 else ''}" if self.level == "sharded" else "") + (
            f" x {self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else "") + (
            f", training with attention dropout {self.dropout:g}" if self.dropout else "")
        return f"{self.name} ({dims}{notes})"

    def to_dict(self) -> dict:
        return asdict(self)


def load_shapes() -> dict[str, dict]:
    text = resources.files("perceiver_fast").joinpath("shapes.json").read_text()
    return {case["name"]: case for case in json.loads(text)["cases"]}


# Decoders (many queries, few keys) run as cross-attention at op level.
KINDS = {"cross": "cross", "causal-cross": "causal", "self": "latent", "decoder": "cross"}


def case_from_shape(name: str, level: str, batch: int | None = None, inputs: int | None = None) -> Case:
    """The published shape `name` as a Case: smallest published batch unless `batch`, M replaced by `inputs`."""
    shape = load_shapes()[name]
    if shape["kind"] not in KINDS or (shape["kind"] == "decoder" and level == "layer"):
        raise ValueError(f"shape {name!r} is a {shape['kind']} shape: no {level}-level case is built from it")
    batches = shape["B"] if isinstance(shape["B"], list) else [shape["B"]]
    B = batch if batch is not None else min(batches)
    notes = []
    if B < min(batches):
        notes.append(f"B {min(batches)} -> {B}")
    M = shape["M"]
    if inputs is not None and inputs != M:
        notes.append(f"M {M} -> {inputs}")
        M = inputs
    kind = KINDS[shape["kind"]]
    N = M if kind == "latent" else shape["N"]
    C = shape.get("C", shape["H"] * shape["dqk"]) if kind != "latent" else shape["D_latent"]
    latent_dim = shape.get("D_latent", shape["H"] * shape["dqk"])  # decoders list no latent width
    return Case(name=name, level=level, kind=kind, B=B, H=shape["H"], N=N, M=M, dqk=shape["dqk"], dv=shape["dv"],
                C=C, latent_dim=latent_dim, scaled=", ".join(notes))


def sweep(base: Case, lengths: list[int]) -> list[Case]:
    """base at each input length (latent cases: N = M too), marked as one sweep for the plots."""
    cases = []
    for m in lengths:
        note = base.scaled if m == base.M else ", ".join(filter(None, [base.scaled, f"M {base.M} -> {m}"]))
        n = m if base.kind == "latent" else base.N
        cases.append(replace(base, M=m, N=n, scaled=note, sweep=base.name))
    return cases


def model_case(model: str, inputs: int, batch: int = 1, padded_inputs: int = 0) -> Case:
    """The named model `model` (perceiver_fast.profiler.models) on `inputs` input elements."""
    s = NAMED_MODELS[model].shape(batch, inputs, torch.float32)
    return Case(name=model, level="model", kind="cross", B=batch, H=s.cross_heads, N=s.latents, M=inputs,
                dqk=s.cross_qk, dv=s.cross_v, C=s.channels, latent_dim=s.latent_dim, padded_inputs=padded_inputs)

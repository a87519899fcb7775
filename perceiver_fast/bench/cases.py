"""Benchmark cases: the published Perceiver shapes (perceiver_fast/shapes.json), at op level
(cross_attention, latent_attention) and layer level (a full cross-attention or latent
self-attention layer), with input-length sweeps for the plots."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from importlib import resources


@dataclass(frozen=True)
class Case:
    """One problem. level "op": q, k, v given; "layer": a full layer with LayerNorms and projections.

    kind: "cross", "causal" (bottom-right, Perceiver AR) or "latent" (N == M). C is the input's
    channels (layer level, cross); latent_dim the latents' width (layer level). `scaled` says how
    the published shape was reduced to fit the run, empty when it was not.
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
    scaled: str = ""
    sweep: str = field(default="", compare=False)  # cases of one sweep differ only in M

    @property
    def causal(self) -> bool:
        return self.kind == "causal"

    def attention_flops(self) -> int:
        """Matmul FLOPs of the attention forward: 2 B H P (dqk + dv), P the scored query-key pairs."""
        pairs = self.N * self.M
        if self.causal:
            pairs = sum(min(self.M, max(0, i + self.M - self.N + 1)) for i in range(self.N))
        return 2 * self.B * self.H * pairs * (self.dqk + self.dv)

    def label(self) -> str:
        dims = f"B={self.B} H={self.H} N={self.N} M={self.M} D={self.dqk}" + (
            f"/{self.dv}" if self.dv != self.dqk else "")
        return f"{self.name} ({dims}{', causal' if self.causal else ''})"

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


def quick_cases(device: str) -> list[Case]:
    """The default set: minutes on a 2-core CPU. Batch 1; one sweep of input length for the plots."""
    big = device == "cuda"
    cases = sweep(case_from_shape("hf-vision-fourier-cross", "op"), [3136, 12544, 50176] + ([200704] if big else []))
    cases += [case_from_shape("krasserm-clm-ar", "op", batch=1), case_from_shape("hf-vision-self", "op"),
              case_from_shape("hf-language-cross", "op")]
    cases += sweep(case_from_shape("hf-vision-fourier-cross", "layer"), [3136, 12544, 50176])
    cases += [case_from_shape("hf-vision-self", "layer")]
    return cases


def full_cases(device: str) -> list[Case]:
    """Every cross, causal and latent shape of shapes.json, at published batch sizes where they fit."""
    op = []
    for name, shape in load_shapes().items():
        if shape["kind"] not in KINDS:
            continue
        op.append(case_from_shape(name, "op", batch=None if device == "cuda" else 1))
    lengths = [3136, 12544, 50176, 200704] + ([802816] if device == "cuda" else [])
    cases = sweep(case_from_shape("hf-vision-fourier-cross", "op"), lengths)
    cases += [c for c in op if c.name != "hf-vision-fourier-cross"]
    cases += sweep(case_from_shape("hf-vision-fourier-cross", "layer"), lengths[:4])
    cases += [case_from_shape("hf-vision-self", "layer"), case_from_shape("hf-language-cross", "layer"),
              case_from_shape("long-input-1m", "layer")]
    return cases

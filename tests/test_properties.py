"""Property-based tests (hypothesis): random shapes, layouts, dtypes, masks, scales, extreme and
non-finite values, and malformed arguments, on every backend and cpu path this machine runs,
against the float64 reference.

CI runs PROPERTY_EXAMPLES examples per property and backend (default 20; Triton's interpreted runs a
quarter of that); `make test-properties` runs more. A failure prints the example, replayable with
hypothesis' @reproduce_failure line.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import perceiver_fast as pf
from perceiver_fast.reference import attention_reference

from checks import backend_id, runnable_backends
from problems import OPS, Problem, make_problem, output_rounding_bound, output_with_gradients

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "20"))
BACKENDS = runnable_backends()
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
# Slack of a result against float64 beyond twice the same-dtype reference's error, times the
# largest exact value: accumulation order. Gradients of every dtype take P from the float32 lse
# (docs/design.md), good to about 2^-24 x |lse| relative.
SLACK = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-3}
GRADIENT_SLACK = 1e-4


def examples(backend) -> settings:
    count = max(3, EXAMPLES // 4) if backend[0] == "triton" else EXAMPLES
    return settings(max_examples=count, deadline=None, derandomize=False, database=None,
                    suppress_health_check=list(HealthCheck))


def dtypes_of(kernel: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] + ([torch.float64] if kernel in ("cpu", "reference") else [])


@st.composite
def problems(draw, kernel: str, *, ops=OPS, scales=(None, 0.05, 1.0, 4.0), magnitudes=(1e-3, 1.0, 3.0),
             dtypes=None) -> Problem:
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))  # the tensors too replay from the example
    op = draw(st.sampled_from(ops))
    small = kernel == "triton"  # interpreted: a few hundred microseconds per program
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2 if small else 3))
    N = draw(st.integers(1, 12 if small else 24))
    M = draw(st.integers(1, 40 if small else 70))
    dqk, dv = draw(st.integers(1, 20 if small else 40)), draw(st.integers(1, 20 if small else 40))
    dtype = draw(st.sampled_from(dtypes or dtypes_of(kernel)))
    masked = op != "latent" and draw(st.booleans())
    key_mask = (torch.rand(B, M) > draw(st.sampled_from([0.1, 0.5, 0.95]))) if masked else None
    return make_problem(op, B, H, N, M, dqk, dv, dtype, channels=draw(st.integers(1, 24)), key_mask=key_mask,
                        causal=draw(st.booleans()), scale=draw(st.sampled_from(scales)),
                        magnitude=draw(st.sampled_from(magnitudes)),
                        layout=draw(st.sampled_from(["contiguous", "heads-inner", "strided"])),
                        biases=draw(st.booleans()), norm=draw(st.booleans()))


def assert_near(name: str, got: torch.Tensor, exact: torch.Tensor, same: torch.Tensor, slack: float,
                extra: float = 0.0, size: float | None = None) -> None:
    """max |got - exact| <= 2 x the same-dtype reference's + 2 x half an ulp of the largest value
    + slack x size (default: the largest value) + extra."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    exact = exact.detach().double()
    largest = exact.abs().max().item()
    size = largest if size is None else size
    err = (got.detach().double() - exact).abs().max().item()
    ref_err = (same.detach().double() - exact).abs().max().item()
    bound = 2 * ref_err + torch.finfo(got.dtype).eps * largest + slack * size + extra
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (same-dtype reference {ref_err:.3g})"


def exact_and_same(problem: Problem, dout: torch.Tensor, dtype: torch.dtype):
    """(float64 results, same-dtype reference results): {"out", "d<input>"} each."""
    results = []
    for compute in (torch.float64, dtype):
        leaves = {name: t.detach().to(compute).requires_grad_() for name, t in problem.inputs.items()}
        results.append(output_with_gradients(problem, problem.reference(compute, leaves), dout.to(compute), leaves))
    return results


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
def test_matches_float64(backend):
    @examples(backend)
    @given(problems(backend[0]))
    def check(problem):
        dtype = problem.inputs["q"].dtype
        out = problem.run(backend)
        assert out.dtype == dtype
        dout = torch.randn(out.shape, dtype=torch.float64).to(dtype)
        exact, same = exact_and_same(problem, dout, dtype)
        assert_near("out", out, exact["out"], same["out"], SLACK[dtype])
        if dtype == torch.bfloat16:
            return  # bfloat16 gradients: the contract tests' rule (tests/checks.py)
        got = output_with_gradients(problem, out, dout)
        # Gradients that cancel (dq, dk of near-uniform rows) are judged against the largest result.
        size = max(t.abs().max().item() for t in exact.values())
        for name in got:
            if name != "out":
                assert_near(name, got[name], exact[name], same[name], GRADIENT_SLACK, size=size)
    check()


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
def test_extreme_scores(backend):
    # Scaled scores up to 1e14 and far apart: outputs as float64's within what float32 scores
    # resolve; gradients finite, dv within what the float32 log-sum-exp resolves (docs/design.md:
    # the backward takes P = exp(s - lse), and lse's ulp grows with it).
    @examples(backend)
    @given(problems(backend[0], ops=("cross", "latent"), scales=(1e3, 1e6, 1e10), magnitudes=(1.0, 1e3),
                    dtypes=[torch.float32, torch.bfloat16]))
    def check(problem):
        dtype = problem.inputs["q"].dtype
        out = problem.run(backend)
        dout = torch.randn(out.shape, dtype=torch.float64).to(dtype)
        exact, same = exact_and_same(problem, dout, dtype)
        t = {name: x.detach().double() for name, x in problem.inputs.items()}
        rounding = output_rounding_bound(problem)  # its summation order is the kernel's own
        assert_near("out", out, exact["out"], same["out"], SLACK[dtype], extra=rounding)
        got = output_with_gradients(problem, out, dout)
        for name, g in got.items():
            assert torch.isfinite(g).all(), f"{name}: non-finite values"
        lse = attention_reference(t["q"], t["k"], t["v"], key_mask=problem.key_mask, causal=problem.causal,
                                  scale=problem.scale)[1]
        lse_ulp = torch.finfo(torch.float32).eps * lse[torch.isfinite(lse)].abs().max().item() if \
            torch.isfinite(lse).any() else 0.0
        rows = problem.shape[2]
        assert_near("dv", got["dv"], exact["dv"], same["dv"], SLACK[dtype],
                    extra=rows * (lse_ulp + rounding / t["v"].abs().max().item()) * dout.abs().max().item())
    check()


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
def test_non_finite_inputs_propagate(backend):
    # The rule of docs/design.md: a row is non-finite exactly where the float64 reference's is,
    # except rows that give a non-finite v probability 0 (unspecified: 0 x inf).
    @examples(backend)
    @given(problems(backend[0], scales=(None, 1.0), magnitudes=(1.0,)), st.data())
    def check(problem, data):
        names = [name for name in ("q", *problem.key_side) if name in problem.inputs]
        for _ in range(data.draw(st.integers(1, 3))):
            name = data.draw(st.sampled_from(names))
            t = problem.inputs[name].detach().clone()
            index = tuple(data.draw(st.integers(0, size - 1)) for size in t.shape)
            # The input op may take q.(W x) as (q W).x: infinities meet zeros and each other in
            # another order (docs/design.md), so it gets NaN only.
            t[index] = data.draw(st.sampled_from(NON_FINITE[:1] if problem.op == "input" else NON_FINITE))
            problem.inputs[name] = t.requires_grad_()
        # Pairs whose probability is 0 (masked, or a -inf score) multiply v by 0: unspecified
        # where v is not finite.
        k, v = problem.keys_and_values(torch.float64)
        scores = problem.inputs["q"].detach().double() @ k.transpose(-1, -2)
        zero_probability = ~problem.allowed() | (scores == float("-inf"))
        bad_values = ~torch.isfinite(v).all(-1)
        specified = ~(zero_probability & bad_values[:, :, None, :]).any(-1)
        out = problem.run(backend).detach()
        want = problem.reference(torch.float64).detach()
        got_finite, want_finite = torch.isfinite(out)[specified], torch.isfinite(want)[specified]
        assert torch.equal(got_finite, want_finite), "non-finite outputs differ from the reference's"
        finite_got, finite_want = out[specified][want_finite].double(), want[specified][want_finite]
        if finite_want.numel():
            err = (finite_got - finite_want).abs().max().item()
            assert err <= 0.05 * max(1.0, finite_want.abs().max().item()), f"finite rows differ by {err:.3g}"
    check()


def corruptions(problem: Problem) -> dict[str, tuple[str, dict]]:
    """name -> (the argument the error must name, the call's arguments changed)."""
    t = problem.inputs
    q = t["q"]
    bad = {"q-rank": ("q", {"q": q[0]}),
           "q-dtype": ("q", {"q": q.to(torch.int32)}),
           "key_mask-shape": ("key_mask", {"key_mask": torch.ones(q.shape[0], problem.shape[3] + 1, dtype=torch.bool)}),
           "key_mask-dtype": ("key_mask", {"key_mask": torch.ones(q.shape[0], problem.shape[3])}),
           "scale-nan": ("scale", {"scale": float("nan")}),
           "scale-type": ("scale", {"scale": "0.5"}),
           "causal-type": ("causal", {"causal": "yes"}),
           "dropout_p-range": ("dropout_p", {"dropout_p": 1.5})}
    if problem.op == "input":
        bad["k_weight-shape"] = ("k_weight", {"k_weight": t["k_weight"][:, :-1] if t["k_weight"].shape[1] > 1
                                             else t["k_weight"][:-1]})
        bad["x-batch"] = ("x", {"x": torch.cat([t["x"], t["x"]])})
    else:
        bad["k-heads"] = ("k", {"k": torch.cat([t["k"], t["k"]], dim=1)})
        bad["v-keys"] = ("v", {"v": torch.cat([t["v"], t["v"]], dim=2)})
        bad["v-dtype"] = ("q, k and v", {"v": t["v"].to(torch.float16 if t["v"].dtype != torch.float16
                                                        else torch.float32)})
    if problem.op == "latent":
        bad["key_mask-shape"] = ("key_mask", {"key_mask": torch.ones(1, 1, dtype=torch.bool)})
        del bad["key_mask-dtype"]
    return bad


def call(problem: Problem, backend: str, changed: dict):
    t = {**problem.inputs, **{k: v for k, v in changed.items() if k in problem.inputs}}
    options = dict(causal=problem.causal, scale=problem.scale, backend=backend)
    options.update({k: v for k, v in changed.items() if k not in problem.inputs})
    if problem.op == "input":
        return pf.fused_input_attention(t["q"], t["x"], k_weight=t["k_weight"], k_bias=t.get("k_bias"),
                                        v_weight=t["v_weight"], v_bias=t.get("v_bias"),
                                        norm_weight=t.get("norm_weight"), norm_bias=t.get("norm_bias"),
                                        norm_eps=problem.norm_eps, **{"key_mask": problem.key_mask, **options})
    if problem.op == "latent":
        return pf.latent_attention(t["q"], t["k"], t["v"], **options)
    return pf.cross_attention(t["q"], t["k"], t["v"], **{"key_mask": problem.key_mask, **options})


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b[1] in (None, "native")], ids=backend_id)
def test_bad_arguments_name_the_argument(backend):
    @examples(backend)
    @given(problems(backend[0], dtypes=[torch.float32]), st.data())
    def check(problem, data):
        bad = corruptions(problem)
        name, (argument, changed) = data.draw(st.sampled_from(sorted(bad.items())))
        with pytest.raises((ValueError, TypeError)) as raised:
            call(problem, backend[0], changed)
        assert argument in str(raised.value), f"{name}: the error does not name {argument}: {raised.value}"
    check()

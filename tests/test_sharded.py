"""Attention over a key axis sharded across processes (perceiver_fast/ops/sharded.py): on 2 and 3
gloo processes, the forward, lse and every gradient equal the single-process call on the
concatenated input (float32, relative error <= 1e-5), with uneven and empty shards, key masks (a
batch item fully masked on one rank), causal rows split at a shard, both fused-input methods and the
composed path, on the cpu and reference backends (and triton under its interpreter); ranks that
disagree (on the op itself, shapes, dtypes, flags, backend) all raise ValueError, none aborting or
hanging."""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
import torch.distributed as dist
from ranks import requires_gloo, run_ranks

import perceiver_fast as pf

pytestmark = requires_gloo
TOLERANCE = 1e-5

# Shard lengths per world size: uneven, with empty shards, and a causal case whose shard boundary
# falls within the last N keys (so a rank runs a causal and a non-causal part).
LENGTHS = {
    "uneven": {2: [23, 9], 3: [5, 0, 27]},
    "empty-first": {2: [0, 32], 3: [0, 0, 32]},
    "split-causal": {2: [28, 4], 3: [20, 7, 5]},
}
CASES = [  # (name, lengths, key mask, causal)
    ("plain", "uneven", None, False),
    ("masked", "uneven", "one-rank-empty", False),
    ("causal", "split-causal", None, True),
    ("causal-masked", "split-causal", "one-rank-empty", True),
    ("empty-first-causal", "empty-first", "one-rank-empty", True),
]
# The Triton kernels run on CPU tensors under the interpreter only (make test sets TRITON_INTERPRET=1).
BACKENDS = ("cpu", "reference") + (("triton",) if os.environ.get("TRITON_INTERPRET") == "1" else ())
BATCH, HEADS, QUERIES, DIM_QK, DIM_V, CHANNELS = 2, 2, 9, 8, 6, 12


def _error(actual, expected, floor: float = 1e-12) -> float:
    if actual is None or expected is None:
        return 0.0 if actual is None and expected is None else float("inf")
    if actual.shape != expected.shape:
        return float("inf")
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)):
        return float("inf")
    a, e = actual.detach()[finite].double(), expected.detach()[finite].double()
    return float((a - e).norm() / max(float(e.norm()), floor)) if e.numel() else 0.0


def _key_mask(kind, lengths, generator):
    if kind is None:
        return None
    mask = torch.rand(BATCH, sum(lengths), generator=generator) > 0.3
    mask[1, :lengths[0] or sum(lengths)] = False  # batch item 1: nothing on rank 0 (everything if it is empty)
    mask[1, -1] = True
    return mask


def _shard(t, lengths, rank, axis):
    return None if t is None else t.narrow(axis, sum(lengths[:rank]), lengths[rank])


def _grads(out, leaves, dout):
    wanted = [t for t in leaves if t is not None]
    found = iter(torch.autograd.grad(out, wanted, dout, allow_unused=True))
    return [None if t is None else next(found) for t in leaves]


def _attention_errors(rank, world, lengths, mask_kind, causal, backend, generator) -> dict:
    total = sum(lengths)
    q = torch.randn(BATCH, HEADS, QUERIES, DIM_QK, generator=generator)
    k = torch.randn(BATCH, HEADS, total, DIM_QK, generator=generator)
    v = torch.randn(BATCH, HEADS, total, DIM_V, generator=generator)
    dout = torch.randn(BATCH, HEADS, QUERIES, DIM_V, generator=generator)
    mask = _key_mask(mask_kind, lengths, generator)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = pf.cross_attention(*leaves, key_mask=mask, causal=causal, return_lse=True, backend=backend)
    full = [out, lse, *_grads(out, leaves, dout)]
    mine = [q.clone().requires_grad_(), *(_shard(t, lengths, rank, 2).clone().requires_grad_() for t in (k, v))]
    out, lse = pf.cross_attention(*mine, key_mask=_shard(mask, lengths, rank, 1), causal=causal, return_lse=True,
                                  backend=backend, process_group=dist.group.WORLD)
    got = [out, lse, *_grads(out, mine, dout)]
    expected = full[:3] + [_shard(g, lengths, rank, 2) for g in full[3:]]
    return {name: _error(a, e) for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, expected)}


def _input_attention_errors(rank, world, lengths, mask_kind, causal, backend, method, generator) -> dict:
    total = sum(lengths)
    q = torch.randn(BATCH, HEADS, QUERIES, DIM_QK, generator=generator)
    x = torch.randn(BATCH, total, CHANNELS, generator=generator)
    weights = [torch.randn(HEADS * DIM_QK, CHANNELS, generator=generator), torch.randn(HEADS * DIM_QK,
               generator=generator), torch.randn(HEADS * DIM_V, CHANNELS, generator=generator),
               torch.randn(HEADS * DIM_V, generator=generator), 1 + 0.1 * torch.randn(CHANNELS, generator=generator),
               0.1 * torch.randn(CHANNELS, generator=generator)]
    dout = torch.randn(BATCH, HEADS, QUERIES, DIM_V, generator=generator)
    mask = _key_mask(mask_kind, lengths, generator)
    names = ("k_weight", "k_bias", "v_weight", "v_bias", "norm_weight", "norm_bias")

    def call(q, x, weights, key_mask, **sharding):
        return pf.fused_input_attention(q, x, **dict(zip(names, weights)), key_mask=key_mask, causal=causal,
                                        method=method, backend=backend, **sharding)

    leaves = [t.clone().requires_grad_() for t in (q, x, *weights)]
    out = call(leaves[0], leaves[1], leaves[2:], mask)
    full = [out, *_grads(out, leaves, dout)]
    mine = [t.clone().requires_grad_() for t in (q, _shard(x, lengths, rank, 1), *weights)]
    out = call(mine[0], mine[1], mine[2:], _shard(mask, lengths, rank, 1), process_group=dist.group.WORLD)
    got = [out, *_grads(out, mine, dout)]
    expected = full[:2] + [_shard(full[2], lengths, rank, 1)] + full[3:]
    errors = {name: _error(a, e) for name, a, e in zip(("out", "dq", "dx", *(f"d{n}" for n in names)), got, expected)}
    # The key bias's gradient is exactly 0 (a shift of every key moves a row's scores by a constant):
    # its shards' partial sums cancel, so it is judged against the key weight's gradient.
    errors["dk_bias"] = _error(got[4], expected[4], floor=float(expected[3].norm()))
    return errors


def _error_message(call) -> str:
    try:
        call()
    except (ValueError, TypeError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def op_checks(rank: int, world: int, seed: int) -> dict:
    results = {}
    for name, lengths_name, mask_kind, causal in CASES:
        lengths = LENGTHS[lengths_name][world]
        for backend in BACKENDS:
            generator = torch.Generator().manual_seed(seed)  # the same full inputs on every rank
            results[f"attention {name} {backend}"] = _attention_errors(rank, world, lengths, mask_kind, causal,
                                                                       backend, generator)
            for method in ("shortcut", "projection"):
                generator = torch.Generator().manual_seed(seed + 1)
                results[f"input attention {name} {backend} {method}"] = _input_attention_errors(
                    rank, world, lengths, mask_kind, causal, backend, method, generator)
    group = dist.group.WORLD
    q = torch.randn(1, 2, 3, 8, generator=torch.Generator().manual_seed(seed))  # the same on every rank
    k, v = torch.randn(1, 2, 4 + rank, 8), torch.randn(1, 2, 4 + rank, 8)
    results["errors"] = {
        "dims": _error_message(lambda: pf.cross_attention(q[..., :8 - rank], k[..., :8 - rank], v, process_group=group)),
        "q": _error_message(lambda: pf.cross_attention(q + rank, k, v, process_group=group)),
        "weights": _error_message(lambda: pf.fused_input_attention(
            q, torch.randn(1, 5, 4), k_weight=torch.full((16, 4), float(rank)), v_weight=torch.ones(16, 4),
            process_group=group)),
        "group type": _error_message(lambda: pf.cross_attention(q, k, v, process_group="world")),
        "empty without a group": _error_message(lambda: pf.cross_attention(q, k[:, :, :0], v[:, :, :0])),
        # one rank's own arguments fail their checks: it raises its error, the others say which rank
        "one rank's bad mask": _error_message(lambda: pf.cross_attention(
            q, k, v, key_mask=torch.ones(1, 4 + rank + rank, dtype=torch.bool), process_group=group)),
        "backends": _error_message(lambda: pf.cross_attention(q, k, v, process_group=group,
                                                              backend=("cpu", "reference")[rank % 2])),
    }
    # still in step after the errors, and the same under torch.compile (which runs the call eagerly)
    eager = pf.cross_attention(q, k, v, process_group=group)
    compiled = torch.compile(lambda a, b, c: pf.cross_attention(a, b, c, process_group=group) * 2)(q, k, v)
    results["compiled"] = _error(compiled, eager * 2)
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_ops_equal_the_single_process_call(tmp_path, world, fresh_seed):
    for rank, results in enumerate(run_ranks(op_checks, world, tmp_path, fresh_seed)):
        errors = results.pop("errors")
        assert results.pop("compiled") <= TOLERANCE, f"rank {rank}: compiled call differs"
        for case, by_output in results.items():
            worst = max(by_output.values())
            assert worst <= TOLERANCE, f"rank {rank}, {case}: errors {by_output}"
        assert errors["dims"].startswith("ValueError: sharded cross_attention: the ranks of process_group disagree "
                                         "on Dqk (rank 0: 8, rank 1: 7"), errors["dims"]
        assert errors["q"].startswith("ValueError: sharded cross_attention: q differs between the ranks"), errors["q"]
        assert errors["weights"].startswith("ValueError: sharded fused_input_attention: k_weight differs"), errors
        assert errors["group type"].startswith("TypeError: process_group must be a torch.distributed.ProcessGroup")
        assert errors["empty without a group"].startswith("ValueError: k must have no empty dimension")
        expected = ("ValueError: key_mask must have shape (B, M) = (1, 5)" if rank == 1 else
                    "ValueError: sharded cross_attention: rank" + ("s 1, 2" if world == 3 else " 1") + " of "
                    "process_group could not make the call")
        assert errors["one rank's bad mask"].startswith(expected if rank < 2 else "ValueError: key_mask"), errors
        assert errors["backends"].startswith("ValueError: sharded cross_attention: the ranks of process_group "
                                             "disagree on backend (rank 0: cpu, rank 1: reference"), errors["backends"]


def _cross(group, queries=3, dim_qk=8, dtype=torch.float32, **options):
    q = torch.randn(1, 2, queries, dim_qk, dtype=dtype, generator=torch.Generator().manual_seed(0))  # replicated
    k, v = torch.randn(1, 2, 5, dim_qk, dtype=dtype), torch.randn(1, 2, 5, 8, dtype=dtype)
    return pf.cross_attention(q, k, v, process_group=group, **options)


def _fused(group, channels=4, dtype=torch.float32, **options):
    q = torch.randn(1, 2, 3, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    weight = torch.ones(16, channels, dtype=dtype)
    return pf.fused_input_attention(q, torch.randn(1, 5, channels, dtype=dtype), k_weight=weight, v_weight=weight,
                                    process_group=group, **options)


def _settled(group, batch):
    from perceiver_fast.patching.masks import settled_reason
    return settled_reason(None, None, batch, 3, 5, False, group)


def _different_ops(first: str, second: str) -> str:
    return f"the ranks of process_group called different ops (rank 0: {first}, rank 1: {second})"


# Calls that do not match between 2 ranks: (rank 0's call, rank 1's, what each rank's ValueError says).
MISMATCHES = {
    "cross_attention-vs-fused_input_attention": (
        _cross, _fused, [_different_ops("cross_attention", "fused_input_attention")] * 2),
    "fused_input_attention-vs-cross_attention": (
        _fused, _cross, [_different_ops("fused_input_attention", "cross_attention")] * 2),
    # the op is agreed on first, even where a rank's own checks failed
    "cross_attention-vs-invalid-fused_input_attention": (
        _cross, functools.partial(_fused, method="fastest"),
        [_different_ops("cross_attention", "fused_input_attention")] * 2),
    "queries": (_cross, functools.partial(_cross, queries=4), ["disagree on N (rank 0: 3, rank 1: 4)"] * 2),
    "channels": (_fused, functools.partial(_fused, channels=5), ["disagree on C (rank 0: 4, rank 1: 5)"] * 2),
    "dtype": (_cross, functools.partial(_cross, dtype=torch.float64),
              ["disagree on dtype (rank 0: float32, rank 1: float64)"] * 2),
    "compute-dtype": (_fused, functools.partial(_fused, dtype=torch.float64),
                      ["disagree on compute dtype (rank 0: float32, rank 1: float64)"] * 2),
    "method": (functools.partial(_fused, method="shortcut"), functools.partial(_fused, method="projection"),
               ["disagree on method (rank 0: shortcut, rank 1: projection)"] * 2),
    "norm_eps": (functools.partial(_fused, norm_eps=None), _fused,
                 ["disagree on norm_eps (rank 0: None, rank 1: 1e-05)"] * 2),
    "scale": (_cross, functools.partial(_cross, scale=0.5),
              ["disagree on scale (rank 0: 0.35355339059327373, rank 1: 0.5)"] * 2),
    "backend-name": (_cross, functools.partial(_cross, backend="fastest"),
                     ["rank 1 of process_group could not make the call", "backend must be None, 'auto' or one of"]),
    # a patched model's sharded input attention settles its fallback on every rank alike
    "patched-batch": (functools.partial(_settled, batch=1), functools.partial(_settled, batch=2),
                      ["disagree on the batch size (rank 0: 1, rank 1: 2)"] * 2),
}


def mismatched_calls(rank: int, world: int) -> dict:
    """Every case of MISMATCHES in turn, each followed by a matching call (which needs the ranks in step)."""
    group = dist.group.WORLD
    results = {}
    for case, calls in MISMATCHES.items():
        print(f"rank {rank}: {case}", file=sys.stderr, flush=True)  # names the case if a rank dies or hangs
        results[case] = {"error": _error_message(lambda: calls[rank](group)),
                         "in step after": bool(torch.isfinite(_cross(group)).all())}
    return results


@pytest.fixture(scope="module")
def mismatch_results(tmp_path_factory) -> list[dict]:
    # one pair of processes for every case: spawning one takes seconds
    return run_ranks(mismatched_calls, 2, tmp_path_factory.mktemp("mismatches"), deadline_s=60)


@pytest.mark.parametrize("case", MISMATCHES)
def test_ranks_making_different_calls_all_raise(mismatch_results, case):
    """Every rank raises ValueError naming the mismatch, and none aborts or hangs (run_ranks fails
    on a rank killed by a signal or still running at its deadline)."""
    for rank, (results, expected) in enumerate(zip(mismatch_results, MISMATCHES[case][2])):
        error = results[case]["error"]
        assert error.startswith("ValueError: ") and expected in error, f"rank {rank}: {error}"
        assert results[case]["in step after"], f"rank {rank}"


def test_process_group_needs_torch_distributed_initialized():
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        pf.cross_attention(q, k, v, process_group=object())


def test_patch_with_a_process_group_needs_torch_distributed_initialized():
    layer = pf.nn.CrossAttention(8, 4)
    from test_ddp import hf_case

    model, _, _ = hf_case()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        pf.patch(model, process_group=object())
    assert layer(torch.randn(1, 2, 8), torch.randn(1, 3, 4)).shape == (1, 2, 8)  # no group: unsharded

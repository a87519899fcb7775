"""Tile and split choices: pure functions, so their rules are checked exhaustively."""

import pytest

from perceiver_fast.kernels import tiles


def test_head_tile_covers_every_dim_with_bounded_padding():
    for d in range(1, 1025):
        t = tiles.head_tile(d)
        assert t in tiles.HEAD_TILES
        padded = -(-d // t) * t
        assert t == tiles.MIN_TILE or (padded - d) / padded <= tiles.MAX_HEAD_PADDING
    assert tiles.head_tile(261) == 64 and tiles.head_tile(322) == 128 and tiles.head_tile(1) == 16


def test_all_configs_contains_every_config_a_launcher_can_pick():
    fwd, bwd = tiles.all_configs()
    fwd, bwd = set(fwd), set(bwd)
    for kind in tiles.KINDS:
        for fp32 in (False, True):
            for dqk in range(1, 1025, 7):
                for dv in (1, 17, 33, 65, 100, 160, 261, 322, 512, 1024):
                    assert (kind, fp32, tiles.forward_config(kind, dqk, dv, fp32)) in fwd
                    assert (kind, fp32, tiles.backward_config(kind, dqk, dv, fp32)) in bwd


def test_configs_respect_tl_dot_minimum():
    fwd, bwd = tiles.all_configs()
    for _, _, cfg in fwd + bwd:
        assert min(cfg.block_n, cfg.block_m, cfg.block_dqk, cfg.block_dv) >= 16


@pytest.mark.parametrize("programs,keys,sms,want", [
    (1000, 1 << 20, 132, 1),     # grid already fills the GPU: no split
    (8, 50176, 132, 33),         # B=1, H=1, N=512: split to fill two waves
    (8, 512, 132, 2),            # short key axis: at least four key steps per split
    (1, 64, 132, 1),
    (1, 1 << 22, 132, 256),      # capped
])
def test_choose_num_splits(programs, keys, sms, want):
    assert tiles.choose_num_splits(programs, keys, 64, sms) == want


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        tiles.forward_config("decoder", 64, 64, False)


def test_compile_check_jobs_come_from_the_launchers():
    """The AOT check's jobs are dry runs of the launchers: every config they can pick appears, with
    every kernel parameter in order and the types Triton gives the launch's values."""
    import inspect

    from perceiver_fast.kernels import compile_check

    jobs = compile_check.launch_jobs()
    assert len(jobs) == len(set(jobs))
    fwd, bwd = tiles.all_configs()
    for kernel, configs in (("_attention_forward_kernel", fwd), ("_attention_backward_kernel", bwd)):
        seen = {(dict(j.constexprs)["BLOCK_N"], dict(j.constexprs)["BLOCK_M"], dict(j.constexprs)["BLOCK_DQK"],
                 dict(j.constexprs)["BLOCK_DV"], j.num_warps, j.num_stages) for j in jobs if j.kernel == kernel}
        wanted = {(c.block_n, c.block_m, c.block_dqk, c.block_dv, c.num_warps, c.num_stages) for _, _, c in configs}
        assert wanted <= seen, f"{kernel}: configs never launched in the dry run: {wanted - seen}"
    for job in jobs:
        params = list(inspect.signature(compile_check._kernel(job.kernel).fn).parameters)
        assert [name for name, _ in job.signature] == params
        types = dict(job.signature)
        assert types["KeyMask" if "KeyMask" in types else params[0]].startswith("*")
        assert all(dict(job.constexprs)[name] is not None for name, t in job.signature if t == "constexpr")
    forward = next(j for j in jobs if j.kernel == "_attention_forward_kernel" and dict(j.constexprs)["HAS_KEY_MASK"])
    assert dict(forward.signature)["KeyMask"] == "*i1" and dict(forward.signature)["stride_qd"] == "constexpr"
    assert dict(forward.constexprs)["INTERPRETED_BF16"] is False

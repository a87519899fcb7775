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

"""The cost model reads the profile's layer timings: in sequence tiles, at lengths calibrate did not time, and the
backward from a saved attention."""

import pytest

from slideformer.models import load_model_config
from slideformer.schedule.profile import Profile
from slideformer.simulator.costs import CostModel


def test_calibrate_times_sequence_tiles_and_the_simulator_reads_them():
    """A sequence longer than a tile is also timed in each tile the planner may choose; the cost model reads
    those entries for a plan in tiles, and without them adds the k/v pass to the whole layer's time."""
    import dataclasses

    from slideformer.calibrate.measure import layer_timings
    from slideformer.models import PRESETS

    cfg = PRESETS["tiny-llama"]
    timings = layer_timings(cfg, 4608, [1], "cpu")
    assert [t.seq_tile for t in timings] == [0, 4096]
    whole, tiled = timings
    assert tiled.tokens == whole.tokens == 4608 and tiled.fwd_s > 0 and tiled.bwd_recompute_s > 0
    profile = Profile.load("h100-80gb")
    measured = CostModel(dataclasses.replace(profile, layers=timings), cfg, 4608)
    assert measured.layer("bwd_recompute_s", 4608, 4096) == tiled.bwd_recompute_s
    assert measured.layer("bwd_recompute_s", 4608) == whole.bwd_recompute_s
    untimed = CostModel(dataclasses.replace(profile, layers=[whole]), cfg, 4608)
    assert untimed.layer("bwd_recompute_s", 4608, 4096) > untimed.layer("bwd_recompute_s", 4608)


def test_a_layer_at_an_untimed_length_is_read_between_the_timed_lengths_around_it():
    """Per token the matmuls cost the same at any length and causal attention grows with it: at a length the
    profile did not time, the time per token is the line through the nearest timed lengths (each at its
    largest chunk), inside the range and beyond it."""
    import dataclasses

    from slideformer.models import PRESETS
    from slideformer.schedule.profile import LayerTiming

    cfg = PRESETS["llama-3.1-8b"]
    shape = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128)

    def timing(seq: int, tokens: int, per_token: float) -> LayerTiming:
        t = per_token * tokens
        return LayerTiming(**shape, seq=seq, tokens=tokens, fwd_s=t, bwd_recompute_s=3 * t, bwd_kept_s=2 * t)

    layers = [timing(1024, 1024, 9.0), timing(1024, 8192, 1.0), timing(32768, 32768, 2.0), timing(131072, 131072, 5.0)]
    profile = dataclasses.replace(Profile.load("h100-80gb"), layers=layers)

    def per_token(seq: int) -> float:
        return CostModel(profile, cfg, seq).layer("fwd_s", 2 * seq) / (2 * seq)

    assert per_token(65536) == pytest.approx(2.0 + 3.0 * (65536 - 32768) / (131072 - 32768))
    assert per_token(16384) == pytest.approx(1.0 + 1.0 * (16384 - 1024) / (32768 - 1024))  # not the 1024-token chunk
    assert per_token(262144) == pytest.approx(5.0 + 3.0 * (262144 - 131072) / (131072 - 32768))
    assert per_token(512) == pytest.approx(1.0)  # below the shortest: no cheaper than it


def test_a_saved_attention_backward_claims_only_the_gain_timed_at_this_length_or_a_shorter_one():
    """Profile F timed the saved backward at 32K and 64K tokens: at 64K its own time; between them and beyond,
    the share of the recompute timed at the longest length below; below 32K no gain (attention's share of a
    layer shrinks with the length, so a longer length's gain would overstate it)."""
    cfg, profile = load_model_config("llama-3.1-8b"), Profile.load("h200-2026-12-02-F")
    timed = {t.seq: t for t in profile.layers if t.bwd_saved_attention_s and t.shape() == cfg.layer_shape()}
    share = {seq: t.bwd_saved_attention_s / t.bwd_recompute_s for seq, t in timed.items()}
    assert sorted(share) == [32768, 65536] and all(s < 1 for s in share.values())
    for seq, claimed in ((2048, 1.0), (16384, 1.0), (49152, share[32768]), (131072, share[65536])):
        cost = CostModel(profile, cfg, seq)
        saved, recompute = (cost.layer(k, seq) for k in ("bwd_saved_attention_s", "bwd_recompute_s"))
        assert saved == pytest.approx(recompute * claimed)
    assert CostModel(profile, cfg, 65536).layer("bwd_saved_attention_s", 65536) == timed[65536].bwd_saved_attention_s

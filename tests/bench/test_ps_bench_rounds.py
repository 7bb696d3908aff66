"""`embps bench ps --standbys both --repeat N`: a ratio per round, from the two phases of that round
only, and their median; bad counts are refused."""

import pytest

from bench.ps_bench import PSBenchConfig, _standby_ratios


def _phase(round_: int, standby: bool, verb: str, clients: int, keys_per_s: float) -> dict:
    return {"round": round_, "malloc": "tuned", "standby": standby, "verb": verb, "clients": clients,
            "keys_per_s": keys_per_s}  # fmt: skip


def test_each_round_pairs_its_own_phases_and_the_median_is_reported():
    phases = [
        _phase(1, False, "push", 4, 100.0),
        _phase(1, True, "push", 4, 60.0),
        _phase(2, False, "push", 4, 50.0),  # a slow minute: both modes of round 2 were slow
        _phase(2, True, "push", 4, 40.0),
        _phase(3, False, "push", 4, 100.0),
        _phase(3, True, "push", 4, 70.0),
        _phase(1, False, "lookup", 1, 10.0),
        _phase(1, True, "lookup", 1, 9.0),
    ]
    ratios = {(r["verb"], r["clients"]): r for r in _standby_ratios(phases)}
    assert ratios[("push", 4)]["rounds"] == pytest.approx([0.6, 0.8, 0.7])
    assert ratios[("push", 4)]["ratio"] == pytest.approx(0.7)
    assert ratios[("lookup", 1)]["rounds"] == pytest.approx([0.9])
    assert ratios[("lookup", 1)]["ratio"] == pytest.approx(0.9)


def test_a_phase_without_its_pair_in_the_same_round_gives_no_ratio():
    phases = [_phase(1, False, "push", 1, 100.0), _phase(2, True, "push", 1, 60.0)]
    assert _standby_ratios(phases) == []


def test_repeat_below_one_is_refused():
    with pytest.raises(ValueError, match="repeat: must be >= 1, got 0"):
        PSBenchConfig(repeat=0)

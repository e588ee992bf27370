import math

import pytest

import gradstab as gs


def test_claim_prints_and_raises(capsys):
    gs.claim(True, "it holds")
    assert capsys.readouterr().out == "✓ it holds\n"
    with pytest.raises(gs.ClaimFailed, match="it fails"):
        gs.claim(False, "it fails")


def test_claim_between_shows_value_and_bounds(capsys):
    gs.claim_between(0.5, 0.0, 1.0, "half")
    assert "measured 0.5; expected 0 to 1" in capsys.readouterr().out
    with pytest.raises(gs.ClaimFailed, match="measured 2"):
        gs.claim_between(2.0, 0.0, 1.0, "two")


def test_claim_seeds_all_by_default(capsys):
    s = gs.claim_seeds([0.25, 0.3, 0.31], "shrink", low=0.2, high=0.35)
    out = capsys.readouterr().out
    assert "3 of 3 seeds in [0.2, 0.35]" in out and "median 0.3, mean 0.2867, range 0.25 to 0.31 over 3 seeds" in out
    assert (s.n, s.median, s.low, s.high) == (3, 0.3, 0.25, 0.31) and abs(s.mean - 0.86 / 3) < 1e-12
    with pytest.raises(gs.ClaimFailed, match="2 of 3 seeds"):
        gs.claim_seeds([0.25, 0.3, 0.5], "shrink", low=0.2, high=0.35)


def test_claim_seeds_k_of_n(capsys):
    gs.claim_seeds([1.0, 2.0, 9.0], "small", high=5, k=2)
    out = capsys.readouterr().out
    assert "2 of 3 seeds at most 5" in out and "needed 2" in out
    with pytest.raises(gs.ClaimFailed, match="1 of 3 seeds"):
        gs.claim_seeds([1.0, 8.0, 9.0], "small", high=5, k=2)


def test_claim_seeds_counts_bools_and_never_nan(capsys):
    gs.claim_seeds([True, True, False], "finite", k=2)
    assert "2 of 3 seeds" in capsys.readouterr().out
    with pytest.raises(gs.ClaimFailed):
        gs.claim_seeds([True, False, False], "finite", k=2)
    with pytest.raises(gs.ClaimFailed, match="2 of 3"):
        gs.claim_seeds([1.0, math.nan, 1.0], "finite value", low=0)


def test_claim_median(capsys):
    s = gs.claim_median([0.9, 0.95, 0.2], 0.9, 1.0, "accuracy")
    assert s.median == 0.9 and "range 0.2 to 0.95" in capsys.readouterr().out
    with pytest.raises(gs.ClaimFailed, match="median expected"):
        gs.claim_median([0.1, 0.2, 0.95], 0.9, 1.0, "accuracy")


@pytest.mark.parametrize("kwargs,name", [
    (dict(values=[]), "values"),
    (dict(values=[1.0], k=2), "k"),
    (dict(values=[1.0, 2.0], k=0), "k"),
    (dict(values=[1.0], low=2, high=1), "low"),
    (dict(values=[True], low=0), "low and high"),
])
def test_claim_seeds_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        gs.claim_seeds(statement="x", **kwargs)


def test_pooled_values_name_their_unit(capsys):
    gs.claim_seeds([1.0, 2.0, 3.0, 4.0], "pooled", high=5, unit="runs")
    assert "4 of 4 runs at most 5" in capsys.readouterr().out
    assert str(gs.spread([1.0, 3.0], unit="runs")).endswith("over 2 runs")

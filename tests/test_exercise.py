import math

import pytest

import gradstab as gs


def test_no_answer_yet_prints_how_to_answer(capsys):
    assert gs.check_answer(None, 4.0, rel=0.25) is None
    out = capsys.readouterr().out
    assert "answer" in out and "25%" in out


@pytest.mark.parametrize("answer, right", [(4.0, True), (4.9, True), (3.1, True), (5.1, False), (-4.0, False),
                                           (math.nan, False)])
def test_relative_tolerance(answer, right, capsys):
    assert gs.check_answer(answer, 4.0, rel=0.25) is right
    assert capsys.readouterr().out.startswith("✓" if right else "✗")


def test_absolute_tolerance_for_answers_near_zero(capsys):
    assert gs.check_answer(0.04, 0.0, rel=0.1, abs_tol=0.05) is True
    assert gs.check_answer(0.06, 0.0, rel=0.1, abs_tol=0.05) is False
    assert "measured 0" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, match", [
    (dict(answer=1.0, expected=math.inf), "expected"), (dict(answer=1.0, expected="3"), "expected"),
    (dict(answer="3", expected=3.0), "answer"), (dict(answer=True, expected=3.0), "answer"),
    (dict(answer=1.0, expected=3.0, rel=-0.1), "rel"), (dict(answer=1.0, expected=3.0, rel=0.0), "rel"),
])
def test_bad_input_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gs.check_answer(**kwargs)


def test_numpy_and_tensor_numbers_are_numbers(capsys):
    import numpy as np
    import torch

    assert gs.check_answer(np.float32(4.1), torch.tensor(4.0), rel=0.1) is True
    assert gs.check_answer(torch.tensor([9.0]), np.array(4.0), rel=0.1) is False
    with pytest.raises(ValueError, match="answer"):
        gs.check_answer(torch.tensor([1.0, 2.0]), 4.0)

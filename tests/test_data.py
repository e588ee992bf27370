import pytest
import torch

import gradstab as gs


def test_shapes_and_sizes(digits):
    assert digits.x_train.shape == (1347, 1, 8, 8) and digits.x_test.shape == (450, 1, 8, 8)
    assert digits.y_train.dtype == torch.int64 and set(digits.y_train.tolist()) == set(range(10))
    assert digits.flat().x_train.shape == (1347, 64)


def test_standardized_with_training_statistics(digits):
    assert abs(digits.x_train.mean().item()) < 1e-5
    assert abs(digits.x_train.std().item() - 1) < 1e-4


def test_split_is_deterministic_and_seeded():
    a, b, c = gs.load_digits("cpu", seed=0), gs.load_digits("cpu", seed=0), gs.load_digits("cpu", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)


def test_split_is_stratified(digits):
    test = torch.bincount(digits.y_test, minlength=10)
    total = test + torch.bincount(digits.y_train, minlength=10)
    assert ((test - 0.25 * total).abs() <= 1).all()


def test_train_and_test_disjoint(digits):
    train = {tuple(x.flatten().tolist()) for x in digits.x_train}
    overlap = sum(tuple(x.flatten().tolist()) in train for x in digits.x_test)
    assert overlap < 10  # the raw data has a few duplicate images, not more


@pytest.mark.parametrize("fraction", [0, 1, -0.2, 1.5])
def test_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        gs.load_digits("cpu", test_fraction=fraction)


def test_batches_cover_an_epoch_without_repeats():
    idx = torch.cat(list(gs.batches(100, 10, 10, seed=3)))
    assert sorted(idx.tolist()) == list(range(100))
    again = torch.cat(list(gs.batches(100, 10, 10, seed=3)))
    assert torch.equal(idx, again)


def test_training_batches_of_a_split_walk_the_seeded_batches(digits):
    from gradstab.data import training_batches

    stream, (x, y) = training_batches(digits, 64, 3, digits.device)
    first = [next(stream) for _ in range(25)]  # past the first reshuffle (21 batches per pass)
    for (_, yb, rows), idx in zip(first, gs.batches(len(digits.y_train), 64, 25, 3), strict=True):
        assert torch.equal(rows.cpu(), idx) and torch.equal(yb, digits.y_train[rows])
    assert x is digits.x_train and y is digits.y_train


def test_training_batches_of_an_iterable_repeat_and_check():
    from gradstab.data import training_batches

    pairs = [(torch.ones(2, 3), torch.zeros(2, dtype=torch.int64)),
             (torch.zeros(1, 3), torch.ones(1, dtype=torch.int64))]

    stream, first = training_batches(pairs, 64, 0, "cpu")
    assert [len(next(stream)[0]) for _ in range(5)] == [2, 1, 2, 1, 2] and first[0].shape == (2, 3)
    with pytest.raises(ValueError, match="data must be"):
        training_batches(3, 64, 0, "cpu")
    with pytest.raises(ValueError, match=r"data\.y must be a torch.Tensor"):
        training_batches([(torch.ones(2), [0, 1])], 64, 0, "cpu")

"""The shared scoring path: validation messages name the field; choose() applies the rules."""

import numpy as np
import pytest

from noiserater.core import scoring, selection

INFO = scoring.RaterInfo(data_shape=(4,), num_timesteps=10)


def request(batch=3, k=5):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, 4)).astype(np.float32), np.arange(batch, dtype=np.int64),
            rng.standard_normal((batch, k, 4)).astype(np.float32))


@pytest.mark.parametrize(
    "mutate, k, message",
    [
        (lambda x0, t, c: (x0, t, c), 6, r"^k: k=6 is larger than the number of candidates K=5"),
        (lambda x0, t, c: (x0, t, c[:, :0]), 1, r"^candidates: K must be at least 1"),
        (lambda x0, t, c: (x0, t, c), 0, r"^k: must be at least 1"),
        (lambda x0, t, c: (x0, t, np.where(np.arange(4) == 2, np.nan, c)), 1, r"^candidates: contains NaN"),
        (lambda x0, t, c: (np.full_like(x0, np.nan), t, c), 1, r"^x0: contains NaN"),
        (lambda x0, t, c: (x0[:, :3], t, c), 1, r"^x0: shape \[3, 3\] does not match"),
        (lambda x0, t, c: (x0, t, c[:2]), 1, r"^candidates: shape \[2, 5, 4\]"),
        (lambda x0, t, c: (x0, t + 10, c), 1, r"^t: timesteps must lie in \[0, 10\)"),
        (lambda x0, t, c: (x0, t.astype(np.float32), c), 1, r"^t: dtype float32"),
    ],
)
def test_validation_names_the_field(mutate, k, message):
    x0, t, c = mutate(*request())
    with pytest.raises(scoring.ScoringError, match=message):
        scoring.validate_selection(INFO, x0, t, c, k, scoring.RULE_TOP_K)


def test_sample_needs_a_positive_temperature():
    x0, t, c = request()
    with pytest.raises(scoring.ScoringError, match=r"^temperature: must be > 0"):
        scoring.validate_selection(INFO, x0, t, c, 1, scoring.RULE_SAMPLE, temperature=0.0)
    scoring.validate_selection(INFO, x0, t, c, 1, scoring.RULE_TOP_K, temperature=0.0)  # unused by top_k


def test_assign_requires_single_candidate():
    x0, t, c = request(k=2)
    with pytest.raises(scoring.ScoringError, match="assign"):
        scoring.validate_selection(INFO, x0, t, c, 1, scoring.RULE_ASSIGN)


def test_expand_and_choose_top_k():
    x0, t, c = request(batch=2, k=3)
    ex0, et, eeps = scoring.expand_candidates(x0, t, c)
    assert ex0.shape == (6, 4) and et.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(eeps[4], c[1, 1])
    flat = np.array([0.1, 0.9, 0.5, 2.0, -1.0, 2.0], np.float32)
    idx, scores = scoring.choose(flat, 2, 3, 2)
    assert idx.tolist() == [[1, 2], [0, 2]]  # tie at 2.0 goes to the lower index
    np.testing.assert_allclose(scores, [[0.9, 0.5], [2.0, 2.0]])


def test_choose_assign_is_a_permutation_maximising_the_sum():
    x0, t, c = request(batch=3, k=1)
    ex0, et, eeps = scoring.expand_candidates(x0, t, c, scoring.RULE_ASSIGN)
    assert ex0.shape == (9, 4)
    np.testing.assert_array_equal(eeps[1], c[1, 0])  # row i, column j=1 scores noise 1
    matrix = np.array([[0, 5, 0], [4, 0, 0], [0, 0, 1]], np.float32)
    idx, _ = scoring.choose(matrix.ravel(), 3, 1, 1, scoring.RULE_ASSIGN)
    assert idx[:, 0].tolist() == [1, 0, 2]


def test_sample_is_seeded_and_follows_the_softmax():
    scores = np.log(np.array([[0.7, 0.2, 0.1]] * 20000))
    picks = selection.sample(scores, 1, 1.0, seed=3)[:, 0]
    np.testing.assert_allclose(np.bincount(picks, minlength=3) / len(picks), [0.7, 0.2, 0.1], atol=0.02)
    np.testing.assert_array_equal(picks, selection.sample(scores, 1, 1.0, seed=3)[:, 0])
    with pytest.raises(selection.SelectionError, match="temperature"):
        selection.sample(scores, 1, 0.0, seed=0)

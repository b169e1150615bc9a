"""The selection plan: validation messages name the field; choose() applies the rules."""

import numpy as np
import pytest

from noiserater.core import scoring, selection
from noiserater.core.selection import Rule, SelectionPlan

INFO = scoring.RaterInfo(data_shape=(4,), num_timesteps=10)


def request(batch=3, k=5):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, 4)).astype(np.float32), np.arange(batch, dtype=np.int64),
            rng.standard_normal((batch, k, 4)).astype(np.float32))


@pytest.mark.parametrize(
    "mutate, k, message",
    [
        (lambda x0, t, c: (x0, t, c), 6, r"^keep: keep=6 is larger than the number of candidates K=5"),
        (lambda x0, t, c: (x0, t, c[:, :0]), 1, r"^candidates: K must be at least 1"),
        (lambda x0, t, c: (x0, t, c), 0, r"^keep: must be at least 1"),
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
        SelectionPlan.for_candidates(c, k, Rule.TOP_K, 1.0).validate(INFO, x0, t, c)


def test_sample_needs_a_positive_temperature():
    x0, t, c = request()
    with pytest.raises(scoring.ScoringError, match=r"^temperature: must be > 0"):
        SelectionPlan.for_candidates(c, 1, Rule.SAMPLE, 0.0)
    SelectionPlan.for_candidates(c, 1, Rule.TOP_K, 0.0).validate(INFO, x0, t, c)  # unused by top_k


def test_assign_requires_single_candidate():
    x0, t, c = request(k=2)
    with pytest.raises(scoring.ScoringError, match="assign"):
        SelectionPlan.for_candidates(c, 1, Rule.ASSIGN, 1.0)


def test_expand_and_choose_top_k():
    x0, t, c = request(batch=2, k=3)
    plan = SelectionPlan(3, keep=2)
    ex0, et, eeps = plan.triples(x0, t, c)
    assert ex0.shape == (6, 4) and et.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(eeps[4], c[1, 1])
    flat = np.array([0.1, 0.9, 0.5, 2.0, -1.0, 2.0], np.float32)
    idx, scores = plan.choose(flat)
    assert idx.tolist() == [[1, 2], [0, 2]]  # tie at 2.0 goes to the lower index
    np.testing.assert_allclose(scores, [[0.9, 0.5], [2.0, 2.0]])


def test_choose_assign_is_a_permutation_maximising_the_sum():
    x0, t, c = request(batch=3, k=1)
    plan = SelectionPlan(1, rule=Rule.ASSIGN)
    ex0, et, eeps = plan.triples(x0, t, c)
    assert ex0.shape == (9, 4)
    np.testing.assert_array_equal(eeps[1], c[1, 0])  # row i, column j=1 scores noise 1
    matrix = np.array([[0, 5, 0], [4, 0, 0], [0, 0, 1]], np.float32)
    idx, _ = plan.choose(matrix.ravel())
    assert idx[:, 0].tolist() == [1, 0, 2]


def test_sample_is_seeded_and_follows_the_softmax():
    scores = np.log(np.array([[0.7, 0.2, 0.1]] * 20000))
    picks = selection.sample(scores, 1, 1.0, seed=3)[:, 0]
    np.testing.assert_allclose(np.bincount(picks, minlength=3) / len(picks), [0.7, 0.2, 0.1], atol=0.02)
    np.testing.assert_array_equal(picks, selection.sample(scores, 1, 1.0, seed=3)[:, 0])
    with pytest.raises(selection.SelectionError, match="temperature"):
        selection.sample(scores, 1, 0.0, seed=0)


def test_rule_has_one_enum_from_argument_to_wire():
    from noiserater.core.v1 import rater_service_pb2 as pb

    assert Rule.parse("argmax") is Rule.TOP_K and Rule.parse("sample") is Rule.SAMPLE
    for rule in Rule:
        assert Rule.from_proto(rule.to_proto()) is rule
    assert Rule.from_proto(pb.SELECTION_RULE_UNSPECIFIED) is Rule.TOP_K
    with pytest.raises(selection.SelectionError, match="^rule: unknown rule 'best'"):
        Rule.parse("best")
    with pytest.raises(selection.SelectionError, match="^rule: unknown selection rule 99"):
        Rule.from_proto(99)


def test_log_probs_are_the_sampling_law():
    plan = SelectionPlan(3, rule=Rule.SAMPLE, temperature=2.0)
    flat = np.log(np.array([0.7, 0.2, 0.1] * 2)) * 2.0
    np.testing.assert_allclose(np.exp(plan.log_probs(flat)), [[0.7, 0.2, 0.1]] * 2, rtol=1e-12)

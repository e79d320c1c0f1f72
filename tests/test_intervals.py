"""Bootstrap 95 % intervals of the set-level metrics (dipo_scale.eval.privacy, eval.tofu, report)."""

from __future__ import annotations

import numpy as np
import pytest

from dipo_scale.eval import privacy, tofu
from dipo_scale.report import markdown_table


def test_auc_equals_sklearn_with_ties_and_batches():
    from sklearn.metrics import roc_auc_score

    member, nonmember = [0.3, 0.9, 0.5, 0.5, 0.1], [0.5, 0.2, 0.2, 0.7]
    expected = roc_auc_score([1] * 5 + [0] * 4, member + nonmember)
    assert privacy.auc_from_scores(member, nonmember) == pytest.approx(expected)
    batch = privacy.auc_from_scores(np.array([member, member[::-1]]), np.array([nonmember, nonmember]))
    assert batch.tolist() == pytest.approx([expected, expected])


def test_auc_interval_brackets_the_auc_and_narrows_with_more_texts():
    rng = np.random.default_rng(0)
    widths = []
    for n in (4, 40, 400):
        member, nonmember = rng.normal(0.5, 1.0, n), rng.normal(0.0, 1.0, n)
        low, high = privacy.auc_interval(member, nonmember)
        assert low <= privacy.auc_from_scores(member, nonmember) <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2] > 0
    assert privacy.auc_interval([1.0, 2.0], [0.0, 0.5]) == [1.0, 1.0]  # separated in every resample
    assert privacy.auc_interval([1.0], [0.0, 0.5]) is None  # one member: no interval
    assert privacy.auc_interval(member, nonmember) == privacy.auc_interval(member, nonmember)  # seeded


def test_privleak_interval_is_paired():
    rng = np.random.default_rng(1)
    scores = (list(rng.normal(1.0, 1.0, 30)), list(rng.normal(0.0, 1.0, 30)))
    # The model as its own retrain model: PrivLeak is 0 on every resample, so the interval is [0, 0]
    # (an unpaired resampling would scatter it both ways).
    assert privacy.privleak_interval(scores, scores) == [0.0, 0.0]
    shifted = ([s + 0.8 for s in scores[0]], scores[1])  # forget texts more likely: leaks
    low, high = privacy.privleak_interval(shifted, scores)
    leak = privacy.privleak(privacy.auc_from_scores(*shifted), privacy.auc_from_scores(*scores))
    assert 0 < low <= leak <= high
    with pytest.raises(ValueError, match="different texts"):
        privacy.privleak_interval(scores, (scores[0][:-1], scores[1]))


def test_forget_quality_interval():
    rng = np.random.default_rng(2)
    retain = rng.uniform(0.2, 1.0, 40)
    assert tofu.forget_quality_interval(retain, retain) == [1.0, 1.0]  # same ratios: p = 1 always
    unlearned = retain * 0.5
    low, high = tofu.forget_quality_interval(unlearned, retain)
    assert low <= tofu.forget_quality(unlearned, retain) <= high < 1.0
    low, high = tofu.forget_quality_interval(unlearned[:30], retain)  # unpaired: sizes differ
    assert low <= tofu.forget_quality(unlearned[:30], retain) <= high < 1.0  # around its estimate, a clear shift


def test_report_shows_intervals():
    table = markdown_table({"m": {"mia_auc": 0.75, "mia_auc_ci": [0.6, 0.9], "privleak": 12.5}})
    assert "| m | 0.7500 [0.6000, 0.9000] | 12.50 |" in table

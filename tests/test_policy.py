import math

import pytest
import torch

from switchkd import SwitchPolicy


def test_thresholds_follow_their_formulas():
    t = torch.tensor([0, 1, 7, 100])
    exp = SwitchPolicy("exp", tau0=0.3, decay=0.05)
    assert torch.allclose(exp.thresholds(t), 0.3 * torch.exp(-0.05 * t.double()))
    assert exp.threshold(7) == pytest.approx(0.3 * math.exp(-0.35))
    linear = SwitchPolicy("linear", tau0=0.3, decay=0.01)
    assert linear.thresholds(t).tolist() == pytest.approx([0.3, 0.29, 0.23, 0.0])
    assert SwitchPolicy("constant", tau0=0.25).thresholds(t).tolist() == [0.25] * 4
    assert SwitchPolicy("never").threshold(3) == math.inf
    assert SwitchPolicy("always").threshold(3) == -math.inf


def test_exp_threshold_decreases():
    policy = SwitchPolicy("exp", tau0=0.5, decay=0.1)
    values = [policy.threshold(t) for t in range(20)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"kind": "cosine"}, ValueError),
        ({"tau0": -0.1}, ValueError),
        ({"decay": float("nan")}, ValueError),
        ({"tau0": "0.2"}, TypeError),
        ({"kind": "topk", "top_k": 0}, ValueError),
        ({"top_k": 2.5}, TypeError),
    ],
)
def test_impossible_policies_raise(kwargs, error):
    with pytest.raises(error):
        SwitchPolicy(**kwargs)

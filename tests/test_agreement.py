import numpy as np
import pytest

from tdpu_tui.engine.model.agreement import judge, one_ulp_perturbation


def metrics(agree, mean_abs=0.01, positions=128):
    return {"argmax_agreement": agree, "mean_abs": mean_abs, "max_abs": 10 * mean_abs,
            "cosine": 0.999, "positions": positions, "finite": True}


def test_one_ulp_moves_every_element_by_exactly_one_ulp():
    x = np.array([1.0, -2.5, 0.0, 3e-38, 1e30], dtype=np.float32)
    y = one_ulp_perturbation(x, seed=3)
    assert (y != x).all()
    assert np.all(np.abs(y.astype(np.float64) - x) <= np.spacing(np.abs(x)).astype(np.float64) * 1.0001 + 1e-45)


def test_above_the_bar_passes_without_a_floor():
    assert judge(metrics(0.995), None) == (True, "")


def test_below_the_bar_without_a_floor_fails():
    ok, why = judge(metrics(0.95), None)
    assert not ok and "95.00%" in why


def test_within_a_chaotic_references_floor_passes_with_the_reason():
    ok, why = judge(metrics(0.7578, 0.05), metrics(0.7578, 0.05))
    assert ok and "one ulp" in why and "not a defect" in why


@pytest.mark.parametrize("m", [metrics(0.05, 0.05),      # a wrong layout: near chance
                               metrics(0.76, 5.0)])      # right argmax by luck, values far off
def test_a_defect_is_below_the_floor_and_fails(m):
    ok, why = judge(m, metrics(0.76, 0.05))
    assert not ok and "below the rounding floor" in why


def test_a_stable_reference_keeps_the_bar():
    ok, _ = judge(metrics(0.97), metrics(1.0, 1e-6))
    assert not ok


def test_non_finite_fails():
    m = metrics(1.0)
    m["finite"] = False
    assert judge(m, None)[0] is False

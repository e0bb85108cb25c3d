"""Arrival schedules: Poisson / gamma inter-arrival statistics of seeded runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.errors import BenchmarkError
from benchmarks.load import arrival_offsets


def gaps(offsets: list[float]) -> np.ndarray:
    return np.diff(np.concatenate([[0.0], offsets]))


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_arrivals_have_the_requested_mean_rate(rate: float) -> None:
    n = 2000
    offsets = arrival_offsets(n, rate, burstiness=1.0, seed=1)
    assert all(b >= a for a, b in zip(offsets, offsets[1:], strict=False))
    # vLLM scales the schedule so the last request goes out at n / rate exactly
    assert offsets[-1] == pytest.approx(n / rate)
    g = gaps(offsets)
    assert g.mean() == pytest.approx(1.0 / rate, rel=1e-9)
    # exponential gaps: coefficient of variation 1, and P(gap < mean) = 1 - 1/e
    assert g.std() / g.mean() == pytest.approx(1.0, abs=0.08)
    assert (g < g.mean()).mean() == pytest.approx(1 - math.exp(-1), abs=0.04)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_changes_variability_not_rate(burstiness: float) -> None:
    offsets = arrival_offsets(4000, 10.0, burstiness=burstiness, seed=2)
    g = gaps(offsets)
    assert g.mean() == pytest.approx(0.1, rel=1e-9)
    # gamma with shape k: CV = 1 / sqrt(k)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_seeded_schedules_repeat_and_infinite_rate_sends_at_once() -> None:
    assert arrival_offsets(50, 3.0, 1.0, seed=5) == arrival_offsets(50, 3.0, 1.0, seed=5)
    assert arrival_offsets(50, 3.0, 1.0, seed=5) != arrival_offsets(50, 3.0, 1.0, seed=6)
    assert arrival_offsets(7, math.inf, 1.0, seed=0) == [0.0] * 7


@pytest.mark.parametrize(("n", "rate", "burst", "flag"), [(0, 1.0, 1.0, "--num-prompts"),
                                                         (5, 0.0, 1.0, "--request-rate"),
                                                         (5, 1.0, 0.0, "--burstiness")])
def test_bad_load_settings_are_clear_errors(n: int, rate: float, burst: float, flag: str) -> None:
    with pytest.raises(BenchmarkError, match=flag):
        arrival_offsets(n, rate, burst, seed=0)

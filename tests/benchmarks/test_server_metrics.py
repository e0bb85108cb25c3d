"""Server-side figures from Prometheus text: histogram means over exactly one run."""

from __future__ import annotations

import pytest

from benchmarks.server_metrics import difference, parse_metrics

BEFORE = """\
# HELP kiln_time_to_first_token_seconds Time to first token
# TYPE kiln_time_to_first_token_seconds histogram
kiln_time_to_first_token_seconds_bucket{model="ensemble",instance="a",le="0.1"} 1
kiln_time_to_first_token_seconds_bucket{model="ensemble",instance="a",le="+Inf"} 2
kiln_time_to_first_token_seconds_sum{model="ensemble",instance="a"} 0.3
kiln_time_to_first_token_seconds_count{model="ensemble",instance="a"} 2
# HELP kiln_generation_tokens_total Tokens generated
# TYPE kiln_generation_tokens_total counter
kiln_generation_tokens_total{model="ensemble",instance="a"} 100
# HELP nv_inference_count Triton's own
# TYPE nv_inference_count counter
nv_inference_count{model="ensemble",version="1"} 7
"""

AFTER = """\
# HELP kiln_time_to_first_token_seconds Time to first token
# TYPE kiln_time_to_first_token_seconds histogram
kiln_time_to_first_token_seconds_bucket{model="ensemble",instance="a",le="0.1"} 3
kiln_time_to_first_token_seconds_bucket{model="ensemble",instance="a",le="+Inf"} 4
kiln_time_to_first_token_seconds_sum{model="ensemble",instance="a"} 0.5
kiln_time_to_first_token_seconds_count{model="ensemble",instance="a"} 4
kiln_time_to_first_token_seconds_bucket{model="ensemble",instance="b",le="+Inf"} 2
kiln_time_to_first_token_seconds_sum{model="ensemble",instance="b"} 0.4
kiln_time_to_first_token_seconds_count{model="ensemble",instance="b"} 2
# HELP kiln_generation_tokens_total Tokens generated
# TYPE kiln_generation_tokens_total counter
kiln_generation_tokens_total{model="ensemble",instance="a"} 164
"""


def test_histogram_mean_and_counter_increase_over_a_run() -> None:
    before, after = parse_metrics(BEFORE), parse_metrics(AFTER)
    assert "nv_inference_count" not in before.counters  # only kiln_* families are kept
    diff = difference(before, after)
    ttft = diff["histograms"]["kiln_time_to_first_token_seconds"]
    # instances summed: sum 0.9 - 0.3 = 0.6 over 6 - 2 = 4 requests
    assert ttft["count"] == 4
    assert ttft["mean"] == pytest.approx(0.15)
    assert diff["counters"]["kiln_generation_tokens"] == pytest.approx(64)


def test_histogram_without_new_observations_has_no_mean() -> None:
    same = parse_metrics(BEFORE)
    assert difference(same, same)["histograms"]["kiln_time_to_first_token_seconds"]["mean"] is None

"""Metric arithmetic on constructed timestamp sequences, against hand-computed values."""

from __future__ import annotations

import pytest

from benchmarks.errors import BenchmarkError
from benchmarks.metrics import (
    RequestRecord,
    compute_metrics,
    count_output_tokens,
    parse_slo,
    peak_concurrency,
    request_tpot,
)


def streamed(index: int, start: float, chunk_times: list[float], tokens: int, text: str = "") -> RequestRecord:
    """A successful record whose chunks arrived at the given absolute times."""
    record = RequestRecord(index=index, prompt_len=10, expected_output_len=tokens, start_time=start, sent=True)
    for t in chunk_times:
        record.on_output(text, t)
    record.success = True
    record.server_output_tokens = tokens
    return record


def test_ttft_itl_e2el_and_tpot_of_one_request() -> None:
    # sent at 1.0; chunks at 1.2, 1.25, 1.35, 1.40 -> TTFT 200 ms, ITL 50/100/50 ms, E2EL 400 ms
    r = streamed(0, 1.0, [1.2, 1.25, 1.35, 1.40], tokens=4)
    assert r.ttft == pytest.approx(0.2)
    assert r.itl == pytest.approx([0.05, 0.10, 0.05])
    assert r.latency == pytest.approx(0.4)
    count_output_tokens([r], tokenizer=None)
    # TPOT = (E2EL - TTFT) / (tokens - 1) = (0.4 - 0.2) / 3
    assert request_tpot(r) == pytest.approx(0.2 / 3)


def test_tpot_uses_token_count_not_chunk_count() -> None:
    # 2 chunks carrying 5 tokens: TPOT = (0.5 - 0.1) / 4, while ITL has one 400 ms gap.
    r = streamed(0, 0.0, [0.1, 0.5], tokens=5)
    count_output_tokens([r], tokenizer=None)
    assert request_tpot(r) == pytest.approx(0.1)
    assert r.itl == pytest.approx([0.4])


def test_single_token_request_has_no_tpot() -> None:
    r = streamed(0, 0.0, [0.3], tokens=1)
    count_output_tokens([r], tokenizer=None)
    assert request_tpot(r) is None


def test_aggregates_throughputs_and_percentiles() -> None:
    # Three requests over a 2 s benchmark; one failed request is counted, not averaged.
    a = streamed(0, 0.0, [0.1, 0.2, 0.3], tokens=3)  # TTFT 100, TPOT 100, E2EL 300
    b = streamed(1, 0.5, [0.8, 0.9], tokens=2)  # TTFT 300, TPOT 100, E2EL 400
    c = streamed(2, 1.0, [1.2, 1.5, 1.6, 1.7], tokens=4)  # TTFT 200, TPOT 500/3, E2EL 700
    failed = RequestRecord(index=3, prompt_len=10, expected_output_len=4, start_time=1.0, latency=0.1,
                           sent=True, error="HTTP 500")
    records = [a, b, c, failed]
    count_output_tokens(records, tokenizer=None)
    m = compute_metrics(records, duration_s=2.0)

    assert (m.completed, m.failed, m.cancelled) == (3, 1, 0)
    assert m.total_input_tokens == 30
    assert m.total_output_tokens == 9
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_token_throughput == pytest.approx(19.5)
    assert m.ttft_ms.mean == pytest.approx(200.0)
    assert m.ttft_ms.median == pytest.approx(200.0)
    # numpy linear interpolation over [100, 200, 300]: p90 = 280, p99 = 298
    assert m.ttft_ms.p90 == pytest.approx(280.0)
    assert m.ttft_ms.p99 == pytest.approx(298.0)
    assert m.ttft_ms.std == pytest.approx((20000 / 3) ** 0.5)
    assert m.e2el_ms.mean == pytest.approx(1400 / 3)
    assert m.tpot_ms.mean == pytest.approx((100 + 100 + 500 / 3) / 3)
    # ITL pools every gap: 100,100 | 100 | 300,100,100 -> mean 800/6, median 100
    assert m.itl_ms.count == 6
    assert m.itl_ms.mean == pytest.approx(800 / 6)
    assert m.itl_ms.median == pytest.approx(100.0)
    assert m.request_goodput is None


def test_goodput_counts_requests_meeting_every_slo() -> None:
    a = streamed(0, 0.0, [0.1, 0.2, 0.3], tokens=3)  # TTFT 100, TPOT 100
    b = streamed(1, 0.0, [0.3, 0.4], tokens=2)  # TTFT 300, TPOT 100
    c = streamed(2, 0.0, [0.15, 0.45], tokens=2)  # TTFT 150, TPOT 300
    d = streamed(3, 0.0, [0.2], tokens=1)  # TTFT 200 (boundary, inclusive), TPOT counts as 0
    records = [a, b, c, d]
    count_output_tokens(records, tokenizer=None)
    m = compute_metrics(records, duration_s=4.0, slos=parse_slo("ttft:200,tpot:150"))
    assert m.request_goodput == pytest.approx(2 / 4.0)  # a and d
    only_ttft = compute_metrics(records, duration_s=4.0, slos={"ttft": 150.0})
    assert only_ttft.request_goodput == pytest.approx(2 / 4.0)  # a and c


def test_output_tokens_are_retokenized_text_when_server_gives_no_count(tiny_checkpoint) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llama-gqa"))
    text = "the quick brown fox jumps over a lazy dog"
    record = RequestRecord(index=0, prompt_len=3, expected_output_len=9, start_time=0.0, sent=True)
    for piece in ["the quick", " brown fox", " jumps over a lazy dog"]:  # 3 chunks
        record.on_output(piece, 0.1)
    record.success = True
    count_output_tokens([record], tokenizer)
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert record.generated_text == text
    assert record.output_tokens == expected
    assert record.output_tokens != record.num_chunks


def test_peak_concurrency_from_half_open_intervals() -> None:
    records = [
        RequestRecord(index=0, prompt_len=1, expected_output_len=1, start_time=0.0, latency=1.0, sent=True),
        RequestRecord(index=1, prompt_len=1, expected_output_len=1, start_time=0.5, latency=1.0, sent=True),
        # starts exactly when 0 ends: not concurrent with it
        RequestRecord(index=2, prompt_len=1, expected_output_len=1, start_time=1.0, latency=0.2, sent=True),
        RequestRecord(index=3, prompt_len=1, expected_output_len=1, start_time=0.6, latency=0.0),  # never sent
    ]
    assert peak_concurrency(records) == 2


@pytest.mark.parametrize("spec", ["ttft", "ttft:abc", "latency:5", "tpot:-1", "ttft:0"])
def test_bad_slo_spec_is_a_clear_error(spec: str) -> None:
    with pytest.raises(BenchmarkError, match="--slo"):
        parse_slo(spec)

"""The load generator (ingress/loadgen.py) without a server: the planned arrivals and lengths, and what a run
reports for a fake endpoint that streams one chunk per token."""

from __future__ import annotations

import pytest

from ingress import loadgen
from ingress.loadgen import LoadSpec


def test_closed_loop_plan_has_exact_lengths_and_no_arrival_times():
    plan = LoadSpec(concurrency=2, requests=5, prompt_len=7, output_len=3).plan()
    assert [(p.at, len(p.prompt), p.output_len) for p in plan] == [(None, 7, 3)] * 5
    assert plan == LoadSpec(concurrency=2, requests=5, prompt_len=7, output_len=3).plan()  # seeded


def test_open_loop_plan_is_a_seeded_poisson_process_with_spread_lengths():
    spec = LoadSpec(requests=2000, prompt_len=20, output_len=10, rate=4.0, spread=0.5, seed=3)
    plan = spec.plan()
    times = [p.at for p in plan]
    assert times == sorted(times) and times[0] > 0
    assert times[-1] / len(times) == pytest.approx(1 / spec.rate, rel=0.1)  # mean gap 1/rate
    assert {len(p.prompt) for p in plan} == set(range(10, 31))
    assert {p.output_len for p in plan} == set(range(5, 16))
    assert plan != LoadSpec(requests=2000, prompt_len=20, output_len=10, rate=4.0, spread=0.5, seed=4).plan()


@pytest.mark.parametrize("field, bad", [("rate", 0.0), ("rate", float("inf")), ("spread", 1.0), ("requests", 0)])
def test_bad_specs_are_refused_by_name(field, bad):
    with pytest.raises(ValueError, match=field):
        LoadSpec(**{field: bad})


@pytest.mark.parametrize("rate", [None, 2000.0])
def test_run_reports_every_request_token_and_gap(rate):
    spec = LoadSpec(concurrency=3, requests=12, prompt_len=4, output_len=6, rate=rate, spread=0.5, seed=1)

    def one(prompt, output_len):
        assert len(prompt) in range(2, 7)
        yield from [1] * output_len

    result = loadgen._run_threads("fake", spec, one)
    lengths = [p.output_len for p in spec.plan()]
    assert result.errors == 0 and result.output_tokens == sum(lengths)
    assert len(result.ttft_s) == len(result.e2e_s) == 12
    assert len(result.itl_s) == sum(n - 1 for n in lengths)
    summary = result.summary()
    assert summary["rate"] == rate and summary["e2e_p99_ms"] >= summary["e2e_p50_ms"]
    assert "ITL p50/p99 ms" in loadgen.format_table([result])


def test_a_failing_request_is_counted_not_raised():
    def one(prompt, output_len):
        yield 1
        raise RuntimeError("server went away")

    result = loadgen._run_threads("fake", LoadSpec(concurrency=2, requests=4, rate=1000.0), one)
    assert result.errors == 4 and len(result.e2e_s) == 0 and result.output_tokens == 4


def test_aiperf_export_is_read_and_its_tokenizer_is_ours(tmp_path):
    from benchmarks import external_load

    stat = {"unit": "ms", "avg": 5.0, "p50": 4.0, "p99": 9.0}
    data = {name: stat for name in ("time_to_first_token", "inter_token_latency", "request_latency")}
    data |= {"output_token_throughput": {"unit": "tokens/sec", "avg": 120.0},
             "request_throughput": {"unit": "requests/sec", "avg": 2.5}}
    row = external_load.parse_export(data, 2.0, 16)
    assert row["ttft_p99_ms"] == 9.0 and row["e2e_p50_ms"] == 4.0 and row["tokens_per_s"] == 120.0
    assert "2/s" in external_load.ExternalResult("AIPerf", [row]).table
    try:
        directory = external_load.tokenizer_dir(tmp_path / "tok")
    except Exception as err:  # noqa: BLE001 - no tokenizer here
        pytest.skip(str(err))
    assert {p.name for p in directory.iterdir()} == {"tokenizer.model", "tokenizer_config.json"}

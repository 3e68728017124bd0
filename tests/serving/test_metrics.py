"""The replica's Prometheus metrics (ingress/metrics.py), without Ray: requests run through the real
`Generation` against a scripted router, timed by a clock that advances 0.5 s per reading, so every
histogram's count and sum is known exactly; counters never go down across scrapes, even when the router's
totals restart; every name docs/observability.md lists is on the page and nothing undocumented is.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cluster.step_timings import RouterTimings
from grok1.engine_api import FinishReason, TokenEvent
from ingress import metrics, protocol
from ingress.generation import Generation
from ingress.ray_export import replay
from tests.serving.fakes import CharTokenizer

REPO = Path(__file__).resolve().parents[2]
MODEL = protocol.ModelInfo("grok-1-tiny", max_len=64, vocab_size=1000, eos_token=2)
TICK = 0.5


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        self.now += TICK
        return self.now


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def options(self, **_):
        return self

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


async def _ready(value):
    return value


class ScriptedRouter:
    """Each request generates `max_tokens` tokens 'a', 'b', ... and ends with length."""

    def __init__(self):
        self.generate = _Method(self._generate)
        self.cancel = _Method(lambda request_id: None)

    async def _generate(self, request, timeout_s=None):
        for k in range(request.max_tokens):
            last = k == request.max_tokens - 1
            yield _ready([TokenEvent(request.request_id, ord("a") + k, -0.5, FinishReason.LENGTH if last else None)])


def run(replica: metrics.ReplicaMetrics, body: dict) -> None:
    params = protocol.parse_completion(body, MODEL, CharTokenizer())

    async def main():
        generation = await Generation(ScriptedRouter(), CharTokenizer(), params, "cmpl-1", replica).start()
        await generation.collect()

    asyncio.run(main())


def scrape(replica: metrics.ReplicaMetrics) -> dict:
    """{(sample name, labels as a sorted tuple): value}"""
    page = replica.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(page) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    matches = [v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


class Request:
    def __init__(self, request_id):
        self.request_id = request_id


def timings(waits=(1, 2), prefills=(0.02, 0.3), decodes=(0.004,) * 5) -> RouterTimings:
    """A router's timings after requests that waited `waits` clock ticks each, and the steps given (seconds)."""
    clock = Clock()
    timed = RouterTimings(clock)
    for k, ticks in enumerate(waits):
        timed.arrived(f"r{k}")
        clock.now += (ticks - 1) * TICK  # the admission's reading adds the last tick
        timed.admitted(Request(f"r{k}"))
        timed.admitted(Request(f"r{k}"))  # re-admitted (preempted, or the group was rebuilt): not a new wait
    for seconds in prefills:
        timed.step("prefill", seconds)
    for seconds in decodes:
        timed.step("decode", seconds)
    return timed


STATS = {"state": "ready", "queue_length": 3, "running": 2, "slots_total": 8, "slots_used": 2,
         "requests_total": {"stop": 5, "length": 7}, "tokens_generated_total": 120, "prompt_tokens_total": 40,
         "expert_token_counts": [[1, 2], [3, 4]], "restarts": 1, "histograms": timings().snapshot(),
         "worker_timings": [{"decode": (10, 0.5), "prefill": (2, 0.25)}, {"decode": (10, 0.75), "prefill": (2, 0.5)}]}
PAGED = {**STATS, "kv_blocks_total": 40, "kv_blocks_used": 10, "preemptions_total": 3,
         "prefix_cache_queried_tokens_total": 96, "prefill_tokens_cached_total": 32}


def test_histograms_count_and_sum_exactly_what_was_sent():
    replica = metrics.ReplicaMetrics("grok-1-tiny", "r1", 64, clock=Clock())
    sent = [(3, 4), (5, 1), (2, 6)]  # (prompt tokens, generated tokens)
    for prompt_len, max_tokens in sent:
        run(replica, {"prompt": "x" * prompt_len, "max_tokens": max_tokens})
    s = scrape(replica)
    # Each clock reading is 0.5 s after the last: arrival, then one reading per token, then the end.
    assert value(s, "grok1_time_to_first_token_seconds_count") == len(sent)
    assert value(s, "grok1_time_to_first_token_seconds_sum") == len(sent) * TICK
    gaps = sum(m - 1 for _, m in sent)
    assert value(s, "grok1_inter_token_latency_seconds_count") == gaps
    assert value(s, "grok1_inter_token_latency_seconds_sum") == gaps * TICK
    assert value(s, "grok1_e2e_request_latency_seconds_count") == len(sent)
    assert value(s, "grok1_e2e_request_latency_seconds_sum") == sum((m + 1) * TICK for _, m in sent)
    assert value(s, "grok1_request_prompt_tokens_count") == len(sent)
    assert value(s, "grok1_request_prompt_tokens_sum") == sum(p for p, _ in sent)
    assert value(s, "grok1_request_generation_tokens_sum") == sum(m for _, m in sent)
    assert value(s, "grok1_request_generation_tokens_bucket", le="2.0") == 1
    assert value(s, "grok1_request_generation_tokens_bucket", le="5.0") == 2
    assert value(s, "grok1_request_success_total", finished_reason="length") == len(sent)
    assert value(s, "grok1_time_to_first_token_seconds_bucket", le="0.5") == len(sent)
    assert value(s, "grok1_time_to_first_token_seconds_bucket", le="0.25") == 0


def test_a_request_of_several_choices_is_one_request():
    replica = metrics.ReplicaMetrics("grok-1-tiny", "r1", 64, clock=Clock())
    run(replica, {"prompt": "yy", "max_tokens": 3, "n": 2})
    s = scrape(replica)
    assert value(s, "grok1_time_to_first_token_seconds_count") == 1
    assert value(s, "grok1_inter_token_latency_seconds_count") == 4  # two gaps in each choice
    assert value(s, "grok1_e2e_request_latency_seconds_count") == 1
    assert value(s, "grok1_e2e_request_latency_seconds_sum") == 7 * TICK  # arrival, 6 tokens, the end
    assert value(s, "grok1_request_generation_tokens_sum") == 6
    assert value(s, "grok1_request_success_total", finished_reason="length") == 2  # one per choice


def test_router_gauges_and_counters_never_decrease_across_scrapes():
    replica = metrics.ReplicaMetrics("grok-1-tiny", "r1", 64, ingress_counts={("http", 200): 4})
    replica.update(STATS)
    first = scrape(replica)
    assert value(first, "grok1_num_requests_running") == 2
    assert value(first, "grok1_num_requests_waiting") == 3
    assert value(first, "grok1_kv_cache_usage_perc") == 0.25
    assert value(first, "grok1_num_preemptions_total") == 0
    assert value(first, "grok1_expert_tokens_total", layer="1", expert="0") == 3
    assert value(first, "grok1_ingress_requests_total", protocol="http", status="200") == 4
    assert value(first, "grok1_replica_state", state="ready") == 1 and value(first, "grok1_up") == 1
    # A router whose totals started again (fewer tokens, fewer restarts, fewer expert tokens): still up.
    replica.update({**STATS, "state": "recovering", "tokens_generated_total": 10, "restarts": 0,
                    "requests_total": {"stop": 1}, "expert_token_counts": [[1, 1], [1, 1]], "running": 0})
    second = scrape(replica)
    counters = [key for key in first if key[0].endswith("_total")]
    assert len(counters) > 10
    for key in counters:
        assert second[key] >= first[key], key
    assert value(second, "grok1_generation_tokens_total") == 130
    assert value(second, "grok1_up") == 0 and value(second, "grok1_num_requests_running") == 0


def documented_names() -> set[str]:
    text = (REPO / "docs" / "observability.md").read_text()
    return set(re.findall(r"^\| `(grok1_[a-z0-9_]+)`", text, re.M))


def test_every_documented_metric_is_on_the_page_and_only_those():
    replica = metrics.ReplicaMetrics("grok-1-tiny", "r1", 64, ingress_counts={("grpc", "OK"): 1})
    replica.update(STATS)
    run(replica, {"prompt": "abc", "max_tokens": 2})
    page = replica.render().decode()
    on_page = {family.name + ("_total" if family.type == "counter" else "")
               for family in text_string_to_metric_families(page)}
    assert documented_names() == set(metrics.exposed_names()) == on_page


def test_length_buckets():
    assert metrics.length_buckets(64) == (1, 2, 5, 10, 20, 50)
    assert metrics.length_buckets(8192)[-1] == 5000


def test_router_histograms_count_and_sum_exactly_what_was_timed():
    replica = metrics.ReplicaMetrics("grok-1-tiny", "r1", 64)
    replica.update(STATS)
    s = scrape(replica)
    assert value(s, "grok1_request_queue_time_seconds_count") == 2  # one wait per request, re-admission or not
    assert value(s, "grok1_request_queue_time_seconds_sum") == 3 * TICK
    assert value(s, "grok1_request_queue_time_seconds_bucket", le="0.5") == 1
    assert value(s, "grok1_request_queue_time_seconds_bucket", le="1.0") == 2
    assert value(s, "grok1_step_seconds_count", phase="prefill") == 2
    assert value(s, "grok1_step_seconds_sum", phase="prefill") == 0.32
    assert value(s, "grok1_step_seconds_bucket", phase="prefill", le="0.025") == 1
    assert value(s, "grok1_step_seconds_count", phase="decode") == 5
    assert value(s, "grok1_step_seconds_bucket", phase="decode", le="0.005") == 5
    assert value(s, "grok1_step_seconds_bucket", phase="decode", le="0.0025") == 0
    assert value(s, "grok1_step_seconds_count", phase="mixed") == 0
    # A new router (its histograms empty again, then one more decode step): nothing goes down.
    replica.update({**STATS, "histograms": timings(waits=(), prefills=(), decodes=(0.004,)).snapshot()})
    again = scrape(replica)
    assert value(again, "grok1_step_seconds_count", phase="decode") == 6
    assert value(again, "grok1_request_queue_time_seconds_count") == 2
    for key in s:
        if key[0].startswith(("grok1_step_seconds", "grok1_request_queue_time_seconds")):
            assert again[key] >= s[key], key


def test_the_paged_cache_is_reported_in_blocks_and_tokens():
    replica = metrics.ReplicaMetrics("grok-1-tiny", "r1", 64)
    replica.update(PAGED)
    s = scrape(replica)
    assert value(s, "grok1_kv_cache_usage_perc") == 0.25  # 10 of 40 blocks, not 2 of 8 slots
    assert value(s, "grok1_num_preemptions_total") == 3
    assert value(s, "grok1_prefix_cache_queries_total") == 96
    assert value(s, "grok1_prefix_cache_hits_total") == 32
    assert value(s, "grok1_decode_slots") == 8
    replica.update({**PAGED, "kv_blocks_used": 30})
    assert value(scrape(replica), "grok1_kv_cache_usage_perc") == 0.75


def test_rays_replay_of_the_router_histograms_keeps_bucket_counts_and_sums():
    first = timings().snapshot()["step_seconds"][1][1]  # decode: five steps of 0.004 s
    assert replay(None, first) == [(0.004, 5)]  # one bucket: the sum is exact
    later = timings(decodes=(0.004,) * 5 + (0.9, 0.001)).snapshot()["step_seconds"][1][1]
    observed = replay(first, later)
    assert sorted(n for _, n in observed) == [1, 1]
    assert {value for value, _ in observed} == {0.001, 1.0}  # their mean, 0.45, lies in neither: each bucket's edge
    assert replay(later, later) == []


def test_each_shard_workers_time_inside_its_steps_is_a_counter_by_worker_and_verb():
    replica = metrics.ReplicaMetrics("grok-1-tiny", "r1", 64)
    replica.update(STATS)
    s = scrape(replica)
    assert value(s, "grok1_worker_steps_total", worker="1", verb="decode") == 10
    assert value(s, "grok1_worker_step_seconds_total", worker="1", verb="decode") == 0.75
    assert value(s, "grok1_worker_step_seconds_total", worker="0", verb="prefill") == 0.25
    # A rebuilt group's workers start from zero: the counters go on from where they were.
    replica.update({**STATS, "worker_timings": [{"decode": (1, 0.125)}, {"decode": (1, 0.25)}]})
    again = scrape(replica)
    assert value(again, "grok1_worker_steps_total", worker="1", verb="decode") == 11
    assert value(again, "grok1_worker_step_seconds_total", worker="0", verb="prefill") == 0.25
    replica.update({**STATS, "worker_timings": None})  # an in-process group has none: nothing goes down
    assert value(scrape(replica), "grok1_worker_steps_total", worker="1", verb="decode") == 11

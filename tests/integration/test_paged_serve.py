"""The paged KV cache behind real Ray Serve (engine.kv_blocks > 0), through the `openai` client over loopback.

One Serve instance for the module: the golden model with the in-process backend, its pool (12 blocks of 8 =
96 tokens) smaller than max_len (128) and than two of the requests here together, and a token budget that
chunks their prompts. Checked: concurrent requests that must preempt one another each get exactly the tokens
the contiguous engine gives them alone; a repeated prompt is served from the prefix cache with the same
tokens; a request that cannot fit the whole pool is refused naming its field while the rest are served; and
/metrics reports the pool, the preemptions and the prefix hits.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_ingress_serve import _free_port, golden_config_file

pytestmark = pytest.mark.slow

CONTIGUOUS = {"max_slots": 4, "max_len": 128, "prefill_buckets": [16, 32, 64], "moe_block_size": 8}
PAGED = {**CONTIGUOUS, "kv_blocks": 12, "kv_block_size": 8, "token_budget": 32}
PROMPT_TOKENS, OUTPUT_TOKENS = 40, 40  # 10 blocks each at the end: two of them never fit the 12 together
APP = "paged"


@pytest.fixture(scope="module")
def paged_server(golden_dir, tmp_path_factory):
    import ray
    from ray import serve

    from ingress.app import build_app, serve_options

    config_path = golden_config_file(golden_dir, tmp_path_factory.mktemp("paged"), PAGED)
    http_port = _free_port()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(**serve_options("127.0.0.1", http_port, _free_port()))
        handle = serve.run(build_app({"config": str(config_path), "ep": 1, "backend": "local"}), name=APP,
                           route_prefix="/")
        yield f"http://127.0.0.1:{http_port}", handle.router_handle.remote().result(timeout_s=60)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def openai_client(paged_server):
    import openai

    return openai.OpenAI(base_url=f"{paged_server[0]}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def prompts(golden) -> list[list[int]]:
    """Three different prompts of PROMPT_TOKENS ids from the golden set's prompts (any golden set's vocabulary)."""
    base = [list(map(int, p)) for p in golden.cases["prompt_ids"]]
    return [((base[k % len(base)] + base[(k + 1) % len(base)]) * PROMPT_TOKENS)[k: k + PROMPT_TOKENS]
            for k in range(3)]


@pytest.fixture(scope="module")
def contiguous_text(golden):
    """Greedy text of a prompt through the contiguous engine alone (the reference)."""
    from cluster.driver import Driver
    from cluster.scheduler import Request, Scheduler
    from grok1.engine import Engine
    from grok1.tokenizer import Tokenizer
    from ingress.text import completion_text

    config = golden.config.replace(engine=CONTIGUOUS)
    engine, tokenizer = Engine(config, golden.params), Tokenizer.load()

    def text(prompt: list[int], max_tokens: int = OUTPUT_TOKENS) -> str:
        scheduler = Scheduler(CONTIGUOUS["max_slots"], CONTIGUOUS["max_len"], config.model.vocab_size,
                              config.model.eos_token)
        [done] = Driver(engine, scheduler).generate([Request("ref", prompt, max_tokens, ignore_eos=True)])
        return completion_text(tokenizer, prompt, done.tokens)

    return text


def metrics(http: str) -> dict[str, float]:
    """/metrics' grok1_* samples by name (one model: labels dropped)."""
    page = requests.get(f"{http}/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(page) for s in f.samples
            if s.name.startswith("grok1_")}


def wait_idle(router, timeout_s: float = 30.0) -> dict:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        stats = ray.get(router.stats.remote(), timeout=30)
        if stats["running"] == 0 and stats["queue_length"] == 0:
            return stats
        assert time.monotonic() < deadline, f"router still busy: {stats}"
        time.sleep(0.1)


def complete(client, prompt: list[int], max_tokens: int = OUTPUT_TOKENS) -> str:
    # ignore_eos (vLLM's extra field, ours too): every request runs its whole length, as the reference does.
    result = client.completions.create(model="grok1-tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == max_tokens
    return result.choices[0].text


def test_concurrent_requests_that_overflow_the_pool_get_the_contiguous_engines_tokens(
        paged_server, openai_client, prompts, contiguous_text):
    """Three requests of 10 blocks each at once against 12 blocks: every one is admitted (its first chunk
    fits), then growing they run out and the newest is preempted and later recomputed; none may differ."""
    http, router = paged_server
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(lambda p: complete(openai_client, p), prompts, timeout=600))
    for prompt, text in zip(prompts, texts):
        assert text == contiguous_text(prompt)
    stats = wait_idle(router)
    assert stats["preemptions_total"] > 0, stats
    assert stats["kv_blocks_used"] == 0 and stats["running_sequences"] == 0, stats
    page = metrics(http)
    assert page["grok1_num_preemptions_total"] == stats["preemptions_total"]
    assert page["grok1_kv_cache_usage_perc"] == 0.0 and page["grok1_num_requests_running"] == 0


def test_a_repeated_prompt_is_served_from_the_prefix_cache_with_the_same_tokens(
        paged_server, openai_client, prompts, contiguous_text):
    http, router = paged_server
    prompt = prompts[0][: PROMPT_TOKENS - 3] + [prompts[1][0]] * 3  # a prompt no earlier test sent
    first = complete(openai_client, prompt, 8)
    before = metrics(http)
    second = complete(openai_client, prompt, 8)
    after = metrics(http)
    assert first == second == contiguous_text(prompt, 8)
    full_blocks = PROMPT_TOKENS // PAGED["kv_block_size"] * PAGED["kv_block_size"]
    hits = after["grok1_prefix_cache_hits_total"] - before["grok1_prefix_cache_hits_total"]
    queries = after["grok1_prefix_cache_queries_total"] - before["grok1_prefix_cache_queries_total"]
    assert hits >= full_blocks - PAGED["kv_block_size"] and queries >= PROMPT_TOKENS, (hits, queries)
    wait_idle(router)


def test_a_request_larger_than_the_pool_is_refused_naming_its_field_and_the_rest_are_served(
        paged_server, openai_client, prompts, contiguous_text):
    """40 + 80 tokens fit max_len (128) but not the pool (96): a 400 naming max_tokens, for it alone."""
    import openai

    http, _ = paged_server
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(complete, openai_client, prompts[2], 8)
        with pytest.raises(openai.BadRequestError) as refused:
            complete(openai_client, prompts[1], 2 * OUTPUT_TOKENS)
        assert good.result(timeout=300) == contiguous_text(prompts[2], 8)
    assert "max_tokens" in str(refused.value) and "KV blocks" in str(refused.value)
    response = requests.post(f"{http}/v1/completions", json={"prompt": prompts[1], "max_tokens": 200}, timeout=60)
    assert response.status_code == 400 and "max_tokens" in response.text

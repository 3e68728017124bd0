"""The ingress on real Ray Serve over loopback, with real clients: the official `openai` package, the generated
gRPC stubs, `requests` for what those cannot send (bad bodies), and ingress.client.

One Serve instance for the module: the golden model (its checkpoint and config, a small engine) behind one
router with the in-process backend (`backend="local"`: one device, no shard workers), so the module runs in a
few minutes on 2 cores. The golden test compares against the engine run in this process.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

ENGINE = {"max_slots": 16, "max_len": 128, "prefill_buckets": [16, 32, 64], "moe_block_size": 8}
MAX_QUEUE = 24
BODY_TIMEOUT_S = 2.0
APP = "grok1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    http: str
    grpc_target: str
    router: object
    model: str
    config_path: str
    loading_http_status: int  # a request sent while the replica was loading
    loading_grpc_code: str  # gRPC Health right after serve.run
    ready_before_serve_run: bool  # the router was ready when the (blocking) serve.run returned
    direct: bool  # clients reach the replica itself (Serve's direct ingress), not Serve's proxy

    def stats(self) -> dict:
        import ray

        return ray.get(self.router.stats.remote())


def golden_config_file(golden_dir, directory, engine: dict):
    """A serving config YAML in `directory`: the golden model and checkpoint with `engine`."""
    model = json.loads((golden_dir / "config.json").read_text())
    config = {"name": "grok1-tiny", "model": model, "engine": engine, "checkpoint": {"path": str(golden_dir)}}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module", params=["proxy", "direct"])
def server(request, golden_dir, tmp_path_factory):
    """The module runs twice: clients through Serve's proxy, then straight to the replica (Serve's direct
    ingress, ingress/direct_ingress.py, as `grok1 serve --direct-ingress`)."""
    import ray
    from ray import serve

    from ingress.app import build_app, serve_options
    from ingress.client import GrpcClient
    from ingress.direct_ingress import DirectIngress
    from ingress.edge import apply_proxy_env

    direct = request.param == "direct"
    config_path = golden_config_file(golden_dir, tmp_path_factory.mktemp("ingress"), ENGINE)
    http_port, grpc_port = _free_port(), _free_port()
    apply_proxy_env()  # what `grok1 serve` does: the proxies' message bound and header stripping
    direct_env = DirectIngress(http_port, grpc_port).env() if direct else {}
    saved_env = {name: os.environ.get(name) for name in direct_env}  # only these are undone afterwards
    os.environ.update(direct_env)  # before Ray starts: Serve's processes read it from their environment
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(**serve_options("127.0.0.1", *((_free_port(), _free_port()) if direct else
                                                   (http_port, grpc_port))))
        app = build_app({"config": str(config_path), "ep": 1, "backend": "local", "max_queue": MAX_QUEUE,
                         "body_timeout_s": BODY_TIMEOUT_S})
        http = f"http://127.0.0.1:{http_port}"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            deploying = pool.submit(serve.run, app, name=APP, route_prefix="/")  # returns once RUNNING
            time.sleep(1.0)  # the replica is loading now: through the proxy these wait for it instead of
            loading_http = pool.submit(_status_while_loading, f"{http}/v1/completions")  # getting 503
            handle = deploying.result(timeout=600)
            router = handle.router_handle.remote().result()
            ready = ray.get(router.stats.remote())["state"] == "ready"
            loading_status = loading_http.result(timeout=600)
        loading_code = GrpcClient(f"127.0.0.1:{grpc_port}").health().state
        yield Server(http, f"127.0.0.1:{grpc_port}", router, "grok1-tiny", str(config_path), loading_status,
                     loading_code, ready, direct)
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _status_while_loading(url: str) -> int | str:
    try:
        return requests.post(url, json={"prompt": "hi", "max_tokens": 1}, timeout=600).status_code
    except requests.ConnectionError:
        return "refused"


@pytest.fixture(scope="module")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grpc_client(server):
    from ingress.client import GrpcClient

    client = GrpcClient(server.grpc_target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server):
    from grok1_api.v1 import grok1_pb2_grpc

    channel = grpc.insecure_channel(server.grpc_target)
    yield grok1_pb2_grpc.Grok1ServiceStub(channel)
    channel.close()


def wait_idle(server, timeout_s: float = 10.0) -> dict:
    """The router's stats once no request is running or queued (fails after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.stats()
        if stats["running"] == 0 and stats["queue_length"] == 0:
            return stats
        assert time.monotonic() < deadline, f"router still busy: {stats}"
        time.sleep(0.05)


def good_request(server):
    response = requests.post(f"{server.http}/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


# ------------------------------------------------------------------------------------------ start-up, health


def test_no_traffic_until_loaded_then_healthy(server, grpc_client):
    """Readiness means loaded: the app is RUNNING only once the weights are loaded and a token was generated,
    and a request sent while the replica was loading was served, not refused with 503 (through the proxy), or
    found no listener (direct: the replica opens its ports once loaded)."""
    assert server.ready_before_serve_run
    assert server.loading_http_status == ("refused" if server.direct else 200)
    assert server.loading_grpc_code == "ready"
    health = requests.get(f"{server.http}/health")
    assert health.status_code == 200 and health.json()["ok"]
    assert grpc_client.health().ok


def test_models_and_metrics(server, openai_client):
    assert [m.id for m in openai_client.models.list().data] == [server.model]
    good_request(server)
    text = requests.get(f"{server.http}/metrics").text
    for name in ("grok1_up", "grok1_num_requests_waiting", "grok1_num_requests_running", "grok1_decode_slots",
                 "grok1_time_to_first_token_seconds", "grok1_inter_token_latency_seconds",
                 "grok1_generation_tokens_total", "grok1_expert_tokens_total"):
        assert f"# TYPE {name} " in text
    assert 'grok1_decode_slots{model_name="grok1-tiny"' in text and "grok1_up{" in text
    assert 'grok1_time_to_first_token_seconds_count{model_name="grok1-tiny"' in text


AT_ZERO = {"grok1_num_preemptions", "grok1_prefix_cache_queries", "grok1_prefix_cache_hits",
           "grok1_replica_restarts"}  # counters no request here increments


def test_replica_metrics_reach_rays_per_node_export(server):
    """What Prometheus scrapes (docs/observability.md): the node's Ray metrics port carries the replica's
    families as ray_grok1_*, the same ones its own page has (counters still at 0 and families without samples
    excepted: Ray shows a metric from its first record)."""
    import ray

    good_request(server)
    page = requests.get(f"{server.http}/metrics").text
    def family(line: str, prefix: str = "") -> str:  # a counter's TYPE line has _total in Ray's text only
        name = line.split()[2][len(prefix):]
        return name.removesuffix("_total")

    # Families with no sample yet are not expected there either: Ray shows a metric from its first record
    # (the shard workers' timings, for one, have none with this in-process backend).
    ours = {f.name for f in text_string_to_metric_families(page) if f.name.startswith("grok1_") and f.samples}
    port = ray._private.worker._global_node.metrics_export_port
    deadline = time.monotonic() + 120  # Ray's agent exports every few seconds
    while True:
        exported = {family(line, "ray_") for line in requests.get(f"http://127.0.0.1:{port}/metrics",
                                                                   timeout=30).text.splitlines()
                    if line.startswith("# TYPE ray_grok1_")}
        missing = ours - exported - AT_ZERO
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, f"not exported through Ray: {sorted(missing)}"


# ------------------------------------------------------------------------------------------ OpenAI client


def test_openai_completions(server, openai_client):
    result = openai_client.completions.create(model=server.model, prompt="The answer is", max_tokens=8)
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 8
    chunks = list(openai_client.completions.create(model=server.model, prompt="The answer is", max_tokens=8,
                                                   stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == result.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == result.usage.prompt_tokens
    echo = openai_client.completions.create(model=server.model, prompt="The answer is", max_tokens=8, echo=True,
                                            logprobs=1)
    assert echo.choices[0].text == "The answer is" + result.choices[0].text
    logprobs = echo.choices[0].logprobs  # the prompt's tokens (the first without a logprob), then the 8 generated
    assert len(logprobs.token_logprobs) == result.usage.prompt_tokens + 8 and logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    two = openai_client.completions.create(model=server.model, prompt="The answer is", max_tokens=4, n=2,
                                           temperature=1.0, seed=5)
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 8


def test_openai_stop_string(server, openai_client):
    full = openai_client.completions.create(model=server.model, prompt="Hello", max_tokens=12).choices[0].text
    stop = full[3:6]
    assert stop.strip(), full
    cut = openai_client.completions.create(model=server.model, prompt="Hello", max_tokens=12, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    wait_idle(server)  # the router's request was cancelled at the stop string


def test_openai_chat(server, openai_client):
    messages = [{"role": "system", "content": "You are Grok."}, {"role": "user", "content": "Say hi."}]
    result = openai_client.chat.completions.create(model=server.model, messages=messages, max_tokens=6)
    assert result.choices[0].message.role == "assistant" and result.choices[0].finish_reason in ("length", "stop")
    chunks = list(openai_client.chat.completions.create(model=server.model, messages=messages, max_tokens=6,
                                                        stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == result.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == result.choices[0].finish_reason


def test_sse_framing_ends_with_done(server):
    with requests.post(f"{server.http}/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True},
                       stream=True) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith(b"data: ") for e in events) and events[-1] == b"data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 3


# ------------------------------------------------------------------------------------------ gRPC


def test_grpc_unary_stream_tokenize(server, stub):
    from grok1_api.v1 import grok1_pb2 as pb

    request = pb.GenerateRequest(text="The answer is", max_tokens=6, logprobs=True)
    unary = stub.Generate(request)
    assert len(unary.token_ids) == 6 and len(unary.logprobs) == 6 and unary.finish_reason == "length"
    assert unary.usage.completion_tokens == 6 and unary.model == server.model
    chunks = list(stub.GenerateStream(request))
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.total_tokens == unary.usage.total_tokens
    assert all(not c.finish_reason for c in chunks[:-1])
    ids = stub.Tokenize(pb.TokenizeRequest(text="Hello world")).token_ids
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == "Hello world"
    assert stub.Health(pb.HealthRequest(probe=True)).ok


@pytest.mark.parametrize("kwargs, code", [
    ({"text": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"tokens": {"ids": [5] * 200}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"text": "hi", "max_tokens": 500}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"text": "hi", "sampling": {"temperature": -1}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"tokens": {"ids": [131072]}}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"text": "hi", "model": "nope"}, grpc.StatusCode.NOT_FOUND),
    ({"text": "hi", "max_tokens": 100, "timeout_s": 0.05}, grpc.StatusCode.DEADLINE_EXCEEDED),
])
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_grpc_errors(server, stub, kwargs, code, method):
    from grok1_api.v1 import grok1_pb2 as pb

    with pytest.raises(grpc.RpcError) as info:
        result = getattr(stub, method)(pb.GenerateRequest(**kwargs))
        list(result) if method == "GenerateStream" else result
    assert info.value.code() == code, info.value.details()
    assert info.value.details()
    good_request(server)
    wait_idle(server)


# ------------------------------------------------------------------------------------------ bad HTTP input


BAD_BODIES = {
    "empty prompt": ({"prompt": ""}, 400),
    "prompt longer than the context": ({"prompt": [5] * 200}, 400),
    "max_tokens overflowing the context": ({"prompt": "hi", "max_tokens": 128}, 400),
    "negative temperature": ({"prompt": "hi", "temperature": -0.5}, 400),
    "top_p zero": ({"prompt": "hi", "top_p": 0}, 400),
    "top_p above one": ({"prompt": "hi", "top_p": 1.01}, 400),
    "negative top_k": ({"prompt": "hi", "top_k": -3}, 400),
    "token id past the vocabulary": ({"prompt": [1, 131072]}, 400),
    "negative token id": ({"prompt": [-7]}, 400),
    "unknown model": ({"prompt": "hi", "model": "gpt-4"}, 404),
}
BAD_RAW = {
    "malformed JSON": (b'{"prompt": "hi", ', 400),
    "invalid UTF-8": (b'{"prompt": "\xc3\x28"}', 400),
    "body over the size limit": (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413),
}


def _bad_cases():
    """Every bad input on both routes, except token-id prompts on chat (chat messages are text)."""
    for route in ["/v1/completions", "/v1/chat/completions"]:
        for bad in list(BAD_BODIES) + list(BAD_RAW):
            prompt = BAD_BODIES[bad][0].get("prompt") if bad in BAD_BODIES else None
            if not (route.endswith("chat/completions") and isinstance(prompt, list)):
                yield route, bad


@pytest.mark.parametrize("route,bad", list(_bad_cases()))
def test_bad_input_then_good_request(server, bad, route):
    if route.endswith("chat/completions") and bad in BAD_BODIES:
        body, status = BAD_BODIES[bad]
        body = {**{k: v for k, v in body.items() if k != "prompt"},
                "messages": [{"role": "user", "content": body["prompt"]}]}
        if bad == "empty prompt":
            status = 200  # the chat template makes it a non-empty prompt
        response = requests.post(f"{server.http}{route}", json=body)
    elif bad in BAD_BODIES:
        body, status = BAD_BODIES[bad]
        response = requests.post(f"{server.http}{route}", json=body)
    else:
        raw, status = BAD_RAW[bad]
        response = requests.post(f"{server.http}{route}", data=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    if status != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"] and error["code"]
    good_request(server)


def test_openai_client_sees_errors(server, openai_client):
    import openai

    with pytest.raises(openai.BadRequestError, match="temperature"):
        openai_client.completions.create(model=server.model, prompt="hi", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="nope", prompt="hi")
    good_request(server)


# ------------------------------------------------------------------------------------------ disconnects


def assert_dropping_cancels(server, start_and_drop, attempts: int = 3, idle_s: float = 10.0) -> None:
    """`start_and_drop()` starts a long request and goes away mid-stream; the router must count it cancelled.

    A tiny-model step is a few milliseconds, so under load a request can reach max_tokens before the
    disconnect has travelled proxy -> replica -> router. Such a trial says nothing (the request ended by
    `length`, not by the client): it is tried again, at most `attempts` times. A disconnect that never
    cancels fails every trial.
    """
    seen = []
    for _ in range(attempts):
        before = server.stats()["requests_total"]
        start_and_drop()
        after = wait_idle(server, idle_s)["requests_total"]
        grew = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in after}
        if grew.get("cancelled", 0) == 1:
            return
        seen.append(grew)
        assert grew.get("length", 0) == 1, f"the dropped request was neither cancelled nor finished: {grew}"
    raise AssertionError(f"every dropped request finished before its cancel arrived: {seen}")


def test_http_client_disconnect_frees_slot(server):
    def start_and_drop():
        response = requests.post(f"{server.http}/v1/completions", stream=True, json={
            "prompt": "Hi", "max_tokens": 120, "ignore_eos": True, "stream": True})
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")
        response.close()  # goes away mid-stream

    assert_dropping_cancels(server, start_and_drop)
    good_request(server)


def test_grpc_client_disconnect_frees_slot(server, stub):
    from grok1_api.v1 import grok1_pb2 as pb

    def start_and_drop():
        call = stub.GenerateStream(pb.GenerateRequest(text="Hi", max_tokens=120, ignore_eos=True))
        next(call)
        call.cancel()

    assert_dropping_cancels(server, start_and_drop)
    good_request(server)


# ------------------------------------------------------------------------------------------ the engine's text


def test_greedy_text_equals_engine(server, golden, grpc_client):
    from cluster.driver import Driver
    from cluster.scheduler import Request, Scheduler
    from grok1.engine import Engine
    from grok1.tokenizer import Tokenizer
    from ingress.client import HttpClient
    from ingress.text import completion_text

    config = golden.config.replace(engine=ENGINE)
    engine = Engine(config, golden.params)
    driver = Driver(engine, Scheduler(ENGINE["max_slots"], ENGINE["max_len"], config.model.vocab_size,
                                      config.model.eos_token))
    prompts = [list(map(int, p)) for p in golden.cases["prompt_ids"]]
    expected = driver.generate([Request(f"g{k}", p, max_tokens=16) for k, p in enumerate(prompts)])
    tokenizer = Tokenizer.load()
    http = HttpClient(server.http)
    for prompt, completion in zip(prompts, expected):
        text = completion_text(tokenizer, prompt, completion.tokens)
        by_grpc = grpc_client.generate(prompt, max_tokens=16)
        assert by_grpc.token_ids == completion.tokens
        assert by_grpc.text == text
        assert http.generate(prompt, max_tokens=16).text == text
        assert "".join(c.text for c in http.stream(prompt, max_tokens=16)) == text


# ------------------------------------------------------------------------------------------ load


def test_32_concurrent_streams_http_and_grpc(server, grpc_client):
    from ingress.client import HttpClient

    prompts = [f"Request number {k} says" for k in range(4)]
    reference = {p: grpc_client.generate(p, max_tokens=12).text for p in prompts}

    def http_stream(k):
        client = HttpClient(server.http)
        return prompts[k % 4], "".join(c.text for c in client.stream(prompts[k % 4], max_tokens=12))

    def grpc_stream(k):
        return prompts[k % 4], "".join(c.text for c in grpc_client.stream(prompts[k % 4], max_tokens=12))

    for stream in (http_stream, grpc_stream):  # 32 at once: 16 in the decode slots, 16 queued (MAX_QUEUE 24)
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = [f.result(timeout=300) for f in [pool.submit(stream, k) for k in range(32)]]
        assert len(results) == 32
        for prompt, text in results:
            assert text == reference[prompt], stream.__name__
        wait_idle(server)


def test_queue_full_is_resource_exhausted_then_serving(server, grpc_client):
    from ingress.client import ClientError

    codes = []
    lock = threading.Lock()

    def one(k):
        try:
            grpc_client.generate(f"load {k}", max_tokens=24)
            code = "OK"
        except ClientError as err:
            code = err.status
        with lock:
            codes.append(code)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(one, range(64)))
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    wait_idle(server)
    good_request(server)


# ------------------------------------------------------------------------------------------ hardening
#
# Each of these reproduces a defect of the previous ingress: a 500 (or a crash of the whole shard group, then a
# rebuild) where a 4xx naming the field was due, or a request that could hurt another client's.

HOSTILE_RAW = {  # (body, the field the 400 must name or None when the body as a whole is at fault)
    "NaN temperature": (b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    "infinite timeout": (b'{"prompt": "hi", "timeout_s": Infinity}', "timeout_s"),
    "NaN timeout": (b'{"prompt": "hi", "timeout_s": NaN}', "timeout_s"),
    "integer of 400 digits": (b'{"prompt": "hi", "temperature": 1' + b"0" * 400 + b"}", "temperature"),
    "integer of 5000 digits": (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "max_tokens"),
    "nested 100,000 deep": (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    "lone surrogate in the prompt": (b'{"prompt": "hi \\ud800 there"}', "prompt"),
    "top_k past int32": (b'{"prompt": "hi", "top_k": 2147483648, "temperature": 1}', "top_k"),
    "seed past int64": (b'{"prompt": "hi", "seed": 9223372036854775808}', "seed"),
    "unimplemented parameter": (b'{"prompt": "hi", "best_of": 4}', "best_of"),
    "unknown parameter": (b'{"prompt": "hi", "temprature": 1}', "temprature"),
    "logit_bias out of range": (b'{"prompt": "hi", "logit_bias": {"5": 1000}}', "logit_bias"),
    "stop string over the limit": (b'{"prompt": "hi", "stop": "' + b"x" * 300 + b'"}', "stop"),
    "prompt over the character limit": (b'{"prompt": "' + b"word " * 50_000 + b'"}', "prompt"),
}
HOSTILE_CHAT = {
    "chat role that is a list": ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages"),
    "chat role that is an object": ({"messages": [{"role": {"x": 1}, "content": "hi"}]}, "messages"),
    "chat lone surrogate": (b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0].content"),
    "chat response_format": ({"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "xml"}}, "response_format.type"),
}


def _post(server, route, body, **kwargs):
    if isinstance(body, bytes):
        return requests.post(f"{server.http}{route}", data=body, headers={"content-type": "application/json"},
                             timeout=60, **kwargs)
    return requests.post(f"{server.http}{route}", json=body, timeout=60, **kwargs)


def _stream_tokens(server, body) -> list[int]:
    """A streamed completion's token ids (logprobs carry one entry per token)."""
    with requests.post(f"{server.http}/v1/completions", json={**body, "stream": True, "logprobs": 1},
                       stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text
        tokens = []
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                tokens += chunk["choices"][0]["logprobs"]["tokens"] if chunk["choices"] else []
        return tokens


def test_hostile_inputs_during_a_live_stream_end_only_themselves(server):
    import ray

    from cluster.scheduler import Request
    from grok1.engine import Sampling

    live = {"prompt": "A stream that must survive", "max_tokens": 60, "ignore_eos": True, "temperature": 0.9,
            "seed": 11}
    alone = _stream_tokens(server, live)
    restarts = server.stats()["restarts"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        during = pool.submit(_stream_tokens, server, live)
        time.sleep(0.5)
        cases = [("/v1/completions", name, *case) for name, case in HOSTILE_RAW.items()] + \
                [("/v1/chat/completions", name, *case) for name, case in HOSTILE_CHAT.items()]
        for route, name, body, field in cases:
            response = _post(server, route, body)
            assert response.status_code == 400, (name, response.status_code, response.text[:300])
            error = response.json()["error"]
            assert error["param"] == field, (name, error)
        # What used to crash every shard worker (seed + choice index past int64; top_k at the int32 edge) is
        # served now, as the sampling it asks for.
        for body in ({"prompt": "hi", "n": 2, "seed": 2 ** 63 - 1, "temperature": 1.0, "max_tokens": 2},
                     {"prompt": "hi", "top_k": 2 ** 31 - 1, "temperature": 1.0, "max_tokens": 2}):
            response = _post(server, "/v1/completions", body)
            assert response.status_code == 200, response.text
        # The router validates what any Ray caller sends, not only what the ingress parsed.
        for sampling in (Sampling(top_k=2 ** 31), Sampling(seed=2 ** 64), Sampling(temperature=float("nan"))):
            with pytest.raises(Exception, match="top_k|seed|temperature"):
                gen = server.router.generate.options(num_returns="streaming").remote(
                    Request(f"direct-{sampling}", [5, 6], 2, sampling))
                ray.get(next(gen))
        assert during.result(timeout=300) == alone  # token for token
    assert server.stats()["restarts"] == restarts  # no shard group was rebuilt
    good_request(server)
    wait_idle(server)


def test_slow_body_upload_is_cut_off(server):
    host, port = server.http.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        started = time.monotonic()
        reply = conn.recv(65536)
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert BODY_TIMEOUT_S - 0.5 < waited < BODY_TIMEOUT_S + 20
    good_request(server)


def test_grpc_request_id_of_a_running_request_cannot_cancel_it(server, stub):
    from grok1_api.v1 import grok1_pb2 as pb

    request = pb.GenerateRequest(text="Shared id", max_tokens=40, ignore_eos=True, request_id="same-id")
    expected = list(stub.Generate(request).token_ids)
    call = stub.GenerateStream(request)
    first = next(call)
    second = stub.Generate(request)  # the same client-chosen id while the first one runs
    assert list(second.token_ids) == expected and second.request_id == "same-id"
    rest = [t for chunk in call for t in chunk.token_ids]
    assert list(first.token_ids) + rest == expected
    wait_idle(server)


def _fill_slots(server, n_slots: int, max_tokens: int = 100):
    """n_slots streaming requests that run for a while; returns the open responses."""
    streams = []
    for k in range(n_slots):
        response = requests.post(f"{server.http}/v1/completions", stream=True, timeout=300, json={
            "prompt": f"busy {k}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True})
        assert response.status_code == 200
        streams.append(response)
    deadline = time.monotonic() + 60
    while server.stats()["running"] < n_slots:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return streams


def test_client_gone_while_queued_is_cancelled_there(server):
    before = server.stats()["requests_total"].get("cancelled", 0)
    # The slots stay busy for as many steps as max_len allows, and the queued client gives up well before: with
    # 100 tokens and a 1.5 s wait, a fast step (tcmalloc's, workers/allocator.py) finished them first.
    streams = _fill_slots(server, ENGINE["max_slots"], max_tokens=ENGINE["max_len"] - 8)
    try:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{server.http}/v1/completions", json={"prompt": "queued", "max_tokens": 100},
                          timeout=0.5)
        deadline = time.monotonic() + 10
        while (stats := server.stats())["queue_length"] > 0:  # it left the queue without being run
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        assert stats["running"] == ENGINE["max_slots"], f"the busy requests ended first, nothing tested: {stats}"
        assert stats["requests_total"].get("cancelled", 0) == before + 1
    finally:
        for response in streams:
            response.close()
    wait_idle(server, 30)


def test_serve_control_headers_from_clients_are_ignored(server):
    # Serve's proxy would end this request after 0.2 s (x-request-timeout-seconds) ...
    response = requests.post(f"{server.http}/v1/completions", timeout=120,
                             headers={"x-request-timeout-seconds": "0.2"},
                             json={"prompt": "Hi", "max_tokens": 60, "ignore_eos": True})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 60
    # ... and keep this one running after its client went away (x-request-disconnect-disabled).
    def start_and_drop():
        response = requests.post(f"{server.http}/v1/completions", stream=True, timeout=120,
                                 headers={"x-request-disconnect-disabled": "?1"},
                                 json={"prompt": "Hi", "max_tokens": 120, "ignore_eos": True, "stream": True})
        next(line for line in response.iter_lines() if line)
        response.close()

    assert_dropping_cancels(server, start_and_drop, idle_s=15)


def test_grpc_messages_are_bounded(server, stub):
    from grok1_api.v1 import grok1_pb2 as pb

    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(pb.TokenizeRequest(text="x" * (8 << 20)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # under the message bound, over the text bound
        stub.Tokenize(pb.TokenizeRequest(text="x" * (ENGINE["max_len"] * 16 + 1)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Detokenize(pb.DetokenizeRequest(token_ids=[5] * (ENGINE["max_len"] + 1)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(text="hi", max_tokens=1, sampling={"temperature": float("nan")}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in info.value.details()
    assert stub.Tokenize(pb.TokenizeRequest(text="Hello")).token_ids
    good_request(server)


def test_logit_bias_and_penalties_are_applied_not_ignored(server, stub):
    from grok1_api.v1 import grok1_pb2 as pb

    forced = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 5, "logit_bias": {"1234": 100}})
    assert forced.status_code == 200 and forced.json()["usage"]["completion_tokens"] == 5
    by_grpc = stub.Generate(pb.GenerateRequest(text="Hello", max_tokens=5, sampling={"logit_bias": {1234: 100}}))
    assert list(by_grpc.token_ids) == [1234] * 5
    plain = stub.Generate(pb.GenerateRequest(text="Hello", max_tokens=12, ignore_eos=True))
    penalised = stub.Generate(pb.GenerateRequest(text="Hello", max_tokens=12, ignore_eos=True,
                                                 sampling={"frequency_penalty": 2.0, "presence_penalty": 2.0}))
    assert len(set(penalised.token_ids)) >= len(set(plain.token_ids))
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(text="Hello", max_tokens=2, sampling={"logit_bias": {-3: 1.0}}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias" in info.value.details()

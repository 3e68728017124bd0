"""`stream_interval` behind real Ray Serve: a server started with stream_interval 3 sends each stream's first
token at once and then chunks of at least 3 tokens (a step's list of tokens is never split), over HTTP (SSE,
read raw) and gRPC (server streaming), with the same tokens and text as the unary answer."""

from __future__ import annotations

import json

import grpc
import pytest
import requests

from tests.integration.test_ingress_serve import ENGINE, _free_port, golden_config_file

pytestmark = pytest.mark.slow

INTERVAL, TOKENS = 3, 11


@pytest.fixture(scope="module")
def chunked_server(golden_dir, tmp_path_factory):
    import ray
    from ray import serve

    from ingress.app import build_app, serve_options

    config_path = golden_config_file(golden_dir, tmp_path_factory.mktemp("chunked"), ENGINE)
    http_port, grpc_port = _free_port(), _free_port()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(**serve_options("127.0.0.1", http_port, grpc_port))
        serve.run(build_app({"config": str(config_path), "ep": 1, "backend": "local",
                             "stream_interval": INTERVAL}), name="chunked", route_prefix="/")
        yield f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def assert_chunked(sizes: list[int]) -> None:
    """The first chunk goes out at once (the first list of tokens), every later one but the last holds at least
    INTERVAL tokens: so there are at most 2 + (TOKENS - 2) // INTERVAL chunks with tokens."""
    assert sum(sizes) == TOKENS and all(size > 0 for size in sizes), sizes
    assert all(size >= INTERVAL for size in sizes[1:-1]), f"a middle chunk under {INTERVAL} tokens: {sizes}"
    assert len(sizes) <= 2 + (TOKENS - 2) // INTERVAL, sizes


def test_http_stream_sends_chunks_of_the_interval_with_the_unary_text(chunked_server):
    http, _ = chunked_server
    body = {"prompt": "The answer is", "max_tokens": TOKENS, "ignore_eos": True, "logprobs": 0}
    unary = requests.post(f"{http}/v1/completions", json=body, timeout=300).json()["choices"][0]
    response = requests.post(f"{http}/v1/completions", json={**body, "stream": True}, stream=True, timeout=300)
    assert response.status_code == 200, response.text
    chunks = [json.loads(line[len(b"data: "):]) for line in response.iter_lines()
              if line.startswith(b"data: {")]
    tokens = [chunk["choices"][0]["logprobs"]["tokens"] for chunk in chunks if chunk["choices"][0]["logprobs"]]
    assert_chunked([len(t) for t in tokens if t])
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == unary["text"]
    assert [t for ts in tokens for t in ts] == unary["logprobs"]["tokens"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_grpc_stream_sends_chunks_of_the_interval_with_the_unary_tokens(chunked_server):
    from grok1_api.v1 import grok1_pb2 as pb
    from grok1_api.v1 import grok1_pb2_grpc

    _, target = chunked_server
    with grpc.insecure_channel(target) as channel:
        stub = grok1_pb2_grpc.Grok1ServiceStub(channel)
        request = pb.GenerateRequest(text="The answer is", max_tokens=TOKENS, ignore_eos=True)
        unary = stub.Generate(request, timeout=300)
        chunks = list(stub.GenerateStream(request, timeout=300))
    assert_chunked([len(c.token_ids) for c in chunks if c.token_ids])
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text and chunks[-1].finish_reason == "length"

"""The ingress's pure parts, without Ray or a model: request parsing and validation, stop strings and
incremental text, SSE framing, error mapping, Prometheus rendering, and the committed gRPC stubs.

A fake tokenizer (one character per token id, id = code point) keeps the text tests exact; the real
SentencePiece tokenizer is used where its spacing and byte fallback matter (skipped when it is missing).
"""

from __future__ import annotations

import filecmp
import pickle
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from ingress import fields, loadgen, metrics, protocol, responses
from ingress.errors import ApiError, from_exception
from ingress.text import TextStream, completion_text, find_stop, held_back
from tests.serving.fakes import TOK

REPO = Path(__file__).resolve().parents[2]
MODEL = protocol.ModelInfo("grok-1-tiny", max_len=64, vocab_size=1000, eos_token=2)




def real_tokenizer():
    from grok1.tokenizer import Tokenizer, TokenizerNotFound

    try:
        return Tokenizer.load()
    except TokenizerNotFound as err:
        pytest.skip(str(err))


# ------------------------------------------------------------------------------------------ parsing


def test_completion_defaults_and_fields():
    p = protocol.parse_completion({"prompt": "hello", "model": "grok-1-tiny", "max_tokens": 5, "temperature": 0.7,
                                   "top_p": 0.9, "top_k": 40, "seed": 3, "stop": "x", "n": 2, "logprobs": 2,
                                   "echo": True, "stream": True, "stream_options": {"include_usage": True}},
                                  MODEL, TOK)
    assert p.prompt == [ord(c) for c in "hello"] and p.max_tokens == 5 and p.stop == ["x"] and p.n == 2
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.logprobs, p.echo, p.stream, p.include_usage) == \
        (0.7, 0.9, 40, 3, 2, True, True, True)
    q = protocol.parse_completion({"prompt": [5, 6, 7]}, MODEL, TOK)
    assert q.prompt == [5, 6, 7] and q.max_tokens == protocol.DEFAULT_MAX_TOKENS and q.temperature == 0.0
    assert protocol.parse_completion({"prompt": ["hi"]}, MODEL, TOK).prompt == [104, 105]  # a list of one
    # the default max_tokens is capped by the context left after the prompt
    assert protocol.parse_completion({"prompt": [5] * 60}, MODEL, TOK).max_tokens == 4


@pytest.mark.parametrize("body, kind, words", [
    ({"prompt": ""}, "invalid_request", "empty"),
    ({}, "invalid_request", "prompt is required"),
    ({"prompt": [5] * 65}, "invalid_request", "exceeds the context"),
    ({"prompt": "hi", "max_tokens": 63}, "invalid_request", "exceeds the context"),
    ({"prompt": "hi", "max_tokens": 0}, "invalid_request", "max_tokens"),
    ({"prompt": "hi", "temperature": -0.1}, "invalid_request", "temperature"),
    ({"prompt": "hi", "top_p": 0}, "invalid_request", "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "invalid_request", "top_p"),
    ({"prompt": "hi", "top_k": -1}, "invalid_request", "top_k"),
    ({"prompt": [1, 1000]}, "invalid_request", "token ids"),
    ({"prompt": [-1, 3]}, "invalid_request", "token ids"),
    ({"prompt": ["a"] * (protocol.MAX_PROMPTS + 1)}, "invalid_request", "prompts; the limit is"),
    ({"prompt": [["a"]]}, "invalid_request", "prompt must be"),
    ({"prompt": {"x": 1}}, "invalid_request", "prompt must be"),
    ({"prompt": "hi", "temperature": "hot"}, "invalid_request", "temperature must be a number"),
    ({"prompt": "hi", "max_tokens": 2.5}, "invalid_request", "max_tokens must be an integer"),
    ({"prompt": "hi", "n": 0}, "invalid_request", "n must be"),
    ({"prompt": "hi", "n": protocol.MAX_N + 1}, "invalid_request", "n must be"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "invalid_request", "at most 4"),
    ({"prompt": "hi", "stop": [1]}, "invalid_request", "stop must be"),
    ({"prompt": "hi", "logprobs": 99}, "invalid_request", "logprobs"),
    ({"prompt": "hi", "stream": "yes"}, "invalid_request", "stream must be true or false"),
    ({"prompt": "hi", "model": "gpt-4"}, "model_not_found", "does not exist"),
])
def test_completion_refusals(body, kind, words):
    with pytest.raises(ApiError) as info:
        protocol.parse_completion(body, MODEL, TOK)
    assert info.value.kind == kind and words in info.value.message


def test_body_limits_and_encoding():
    assert fields.parse_json_body(b'{"prompt": "hi"}') == {"prompt": "hi"}
    for raw, kind, words in [(b"{not json", "invalid_request", "not valid JSON"),
                             (b'{"prompt": "\xff\xfe"}', "invalid_request", "not valid UTF-8"),
                             (b"[1, 2]", "invalid_request", "JSON object"),
                             (b" " * (fields.MAX_BODY_BYTES + 1), "too_large", "limit")]:
        with pytest.raises(ApiError) as info:
            fields.parse_json_body(raw)
        assert info.value.kind == kind and words in info.value.message


def test_chat_template_and_stop():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there "},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
                {"role": "user", "content": "Why?"}]
    text = protocol.render_chat(messages)
    assert text == "Be brief.\n\nUser: Hi there\n\nAssistant: Hello.\n\nUser: Why?\n\nAssistant:"
    model = protocol.ModelInfo("m", 4096, 1 << 20, 2)
    p = protocol.parse_chat({"messages": messages, "stop": ["###"], "logprobs": True, "top_logprobs": 2}, model, TOK)
    assert p.prompt == TOK.encode(text) and p.stop == ["###", protocol.CHAT_STOP] and p.logprobs == 2
    assert p.max_tokens == protocol.DEFAULT_CHAT_MAX_TOKENS
    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}],
                [{"role": "user", "content": [{"type": "image_url"}]}], None):
        with pytest.raises(ApiError):
            protocol.render_chat(bad)


def test_response_shapes_and_sse():
    assert responses.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert responses.SSE_DONE == b"data: [DONE]\n\n"
    assert responses.usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    lp = responses.completion_logprobs([("a", None, 0, []), (" a", -0.5, 1, []),
                                        ("b", -1.0, 3, [("c", -0.1), ("b", -1.0)])])
    assert lp == {"tokens": ["a", " a", "b"], "token_logprobs": [None, -0.5, -1.0],
                  "top_logprobs": [None, {" a": -0.5}, {"c": -0.1, "b": -1.0}], "text_offset": [0, 1, 3]}
    chat = responses.chat_logprobs([("é", -0.25, 0, [("é", -0.25), ("x", -2.0)])])
    assert chat["content"][0]["bytes"] == [0xC3, 0xA9] and chat["content"][0]["top_logprobs"][0]["token"] == "é"
    assert [t["logprob"] for t in chat["content"][0]["top_logprobs"]] == [-0.25, -2.0]
    models = responses.models_response(MODEL, 123)
    assert models["data"][0]["id"] == "grok-1-tiny" and models["object"] == "list"


# ------------------------------------------------------------------------------------------ text


def test_stop_helpers():
    assert find_stop("abcdef", ["de", "bc"]) == 1 and find_stop("abc", ["x"]) is None
    assert find_stop("abcabc", ["abc"], start=1) == 3
    assert held_back("hello wo", ["world"]) == 2 and held_back("hello", ["world"]) == 0
    assert held_back("ab", ["abc", "b"]) == 2


def test_text_stream_cuts_at_stop_strings_across_tokens():
    stream = TextStream(TOK, [], ["STOP"])
    out = [stream.add(t) for t in TOK.encode("abST")]
    assert out == ["a", "b", "", ""]  # "ST" could be the start of "STOP": held back
    assert stream.add(ord("x")) == "STx"  # it was not
    assert [stream.add(t) for t in TOK.encode("yST")] == ["y", "", ""]
    assert stream.add(ord("O")) == "" and stream.add(ord("P")) == "" and stream.stopped
    assert stream.text == "abSTxy" and stream.add(ord("z")) == "" and stream.finish() == ""
    held = TextStream(TOK, [], ["STOP"])
    assert [held.add(t) for t in TOK.encode("aST")] == ["a", "", ""] and held.finish() == "ST"  # ended held
    assert completion_text(TOK, [], TOK.encode("one. two. three"), [". t"]) == "one"


def test_text_stream_real_tokenizer_spacing_and_multibyte():
    tokenizer = real_tokenizer()
    prompt = tokenizer.encode("The answer to life is")
    whole = tokenizer.encode("The answer to life is 42, of course. Héllo 世界 😀 done")
    generated = whole[len(prompt):]
    text = completion_text(tokenizer, prompt, generated)
    assert text == " 42, of course. Héllo 世界 😀 done"  # the leading space kept
    pieces = []
    stream = TextStream(tokenizer, prompt)
    for t in generated:
        piece = stream.add(t)
        assert "\ufffd" not in piece  # never half a character
        pieces.append(piece)
    assert "".join(pieces) + stream.finish() == text
    assert completion_text(tokenizer, prompt, generated, ["世"]) == " 42, of course. Héllo "


# ------------------------------------------------------------------------------------------ errors


def test_error_mapping():
    from cluster.router import Unavailable
    from cluster.scheduler import InvalidRequest, QueueFull

    cases = [(InvalidRequest("the prompt is empty"), 400, grpc.StatusCode.INVALID_ARGUMENT),
             (QueueFull("the queue is full"), 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
             (Unavailable("the replica is loading"), 503, grpc.StatusCode.UNAVAILABLE),
             (TimeoutError(), 504, grpc.StatusCode.DEADLINE_EXCEEDED),
             (RuntimeError("boom"), 500, grpc.StatusCode.INTERNAL)]
    for err, status, code in cases:
        api = from_exception(err)
        assert (api.http_status, api.grpc_code) == (status, code), err
    body = from_exception(InvalidRequest("the prompt is empty")).body()
    assert body == {"error": {"message": "the prompt is empty", "type": "invalid_request_error", "param": None,
                              "code": "invalid_request"}}
    copy = pickle.loads(pickle.dumps(ApiError("queue_full", "full", "x")))  # crosses Ray processes
    assert (copy.kind, copy.message, copy.param, copy.retriable) == ("queue_full", "full", "x", True)


def test_error_mapping_through_ray_wrapper():
    """Ray raises actor errors as RayTaskError subclasses carrying the original in .cause."""
    from ray.exceptions import RayTaskError

    from cluster.scheduler import QueueFull

    wrapped = RayTaskError("Router.generate", "Traceback ...\nQueueFull: the queue is full", QueueFull("full!"))
    assert from_exception(wrapped).kind == "queue_full"
    assert from_exception(wrapped.as_instanceof_cause()).message == "full!"


# ------------------------------------------------------------------------------------------ metrics


def test_prometheus_rendering():
    stats = {"state": "ready", "queue_length": 3, "running": 2, "slots_total": 16, "slots_used": 2,
             "requests_total": {"stop": 5, "length": 7}, "tokens_generated_total": 120, "prompt_tokens_total": 40,
             "expert_token_counts": [[1, 2], [3, 4]], "restarts": 1}
    replica = metrics.ReplicaMetrics("grok-1-tiny", "r1", 64, ingress_counts={("http", 200): 4})
    replica.update(stats)
    lines = replica.render().decode().splitlines()
    common = 'model_name="grok-1-tiny",replica="r1"'
    assert f'grok1_up{{{common}}} 1.0' in lines
    assert f'grok1_num_requests_waiting{{{common}}} 3.0' in lines
    assert f'grok1_router_requests_total{{finished_reason="length",{common}}} 7.0' in lines
    assert f'grok1_expert_tokens_total{{expert="0",layer="1",{common}}} 3.0' in lines
    assert 'grok1_ingress_requests_total{model_name="grok-1-tiny",protocol="http",replica="r1",status="200"} 4.0' \
        in lines  # labels in name order
    assert f'grok1_replica_state{{{common},state="loading"}} 0.0' in lines
    assert "# TYPE grok1_time_to_first_token_seconds histogram" in lines
    for line in lines:  # every sample line is `name{labels} value`
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2
    assert loadgen.quantile([5, 1, 3], 0.5) == 3 and loadgen.quantile([1, 2, 3, 4], 0.99) == 4


# ------------------------------------------------------------------------------------------ stubs


def test_generated_stubs_are_up_to_date(tmp_path):
    """`make protos` output is committed: regenerating from the .proto gives identical files."""
    proto = "proto/grok1_api/v1/grok1.proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", proto], cwd=REPO, check=True)
    for name in ("grok1_pb2.py", "grok1_pb2_grpc.py", "grok1_pb2.pyi"):
        fresh, committed = tmp_path / "grok1_api" / "v1" / name, REPO / "grok1_api" / "v1" / name
        assert filecmp.cmp(fresh, committed, shallow=False), f"{committed} is stale: run `make protos`"


def test_stubs_import_and_round_trip():
    from grok1_api.v1 import grok1_pb2 as pb
    from grok1_api.v1 import grok1_pb2_grpc

    assert hasattr(grok1_pb2_grpc, "add_Grok1ServiceServicer_to_server")
    request = pb.GenerateRequest(text="hi", max_tokens=4, sampling=pb.SamplingParams(temperature=0.5))
    back = pb.GenerateRequest.FromString(request.SerializeToString())
    assert back.WhichOneof("prompt") == "text" and back.sampling.HasField("temperature")
    assert not back.sampling.HasField("top_p") and not back.HasField("timeout_s")


# ------------------------------------------------------------------------------------------ hardening


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
    ({"prompt": "hi", "temperature": float("inf")}, "temperature"),
    ({"prompt": "hi", "temperature": 10 ** 400}, "temperature"),
    ({"prompt": "hi", "temperature": 101}, "temperature"),
    ({"prompt": "hi", "top_p": float("nan")}, "top_p"),
    ({"prompt": "hi", "timeout_s": float("nan")}, "timeout_s"),
    ({"prompt": "hi", "timeout_s": float("inf")}, "timeout_s"),
    ({"prompt": "hi", "timeout_s": 0}, "timeout_s"),
    ({"prompt": "hi", "timeout_s": 10 ** 400}, "timeout_s"),
    ({"prompt": "hi", "top_k": 2 ** 31}, "top_k"),
    ({"prompt": "hi", "max_tokens": 10 ** 400}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": float("inf")}, "max_tokens"),
    ({"prompt": "hi", "seed": 2 ** 63}, "seed"),
    ({"prompt": "hi", "n": 10 ** 30}, "n"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "hi", "frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"1000": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"-1": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": [1, 2]}, "logit_bias"),
    ({"prompt": "\ud800hi"}, "prompt"),
    ({"prompt": "a" * (64 * protocol.CHARS_PER_TOKEN + 1)}, "prompt"),
    ({"prompt": "hi", "stop": ["\udfff"]}, "stop"),
    ({"prompt": "hi", "stop": ["x" * (protocol.MAX_STOP_CHARS + 1)]}, "stop"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "suffix": "end"}, "suffix"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "frobnicate": 1}, "frobnicate"),
])
def test_completion_fields_out_of_range_are_refused_by_name(body, param):
    with pytest.raises(ApiError) as info:
        protocol.parse_completion(body, MODEL, TOK)
    assert info.value.kind == "invalid_request" and info.value.param == param, info.value.message
    assert len(info.value.message) < 300


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"logit_bias": {"5": "high"}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages"),
    ({"messages": [{"role": {"a": 1}, "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "\ud83d"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * (64 * protocol.CHARS_PER_TOKEN + 1)}]},
     "messages[0].content"),
])
def test_chat_fields_refused_by_name(extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(ApiError) as info:
        protocol.parse_chat(body, MODEL, TOK)
    assert info.value.kind == "invalid_request" and info.value.param == param, info.value.message


def test_neutral_values_of_unimplemented_parameters_are_accepted():
    body = {"prompt": "hi", "best_of": 1, "suffix": None, "user": "u1"}
    assert protocol.parse_completion(body, MODEL, TOK).prompt == [104, 105]
    chat = {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"}, "tools": []}
    assert protocol.parse_chat(chat, MODEL, TOK).prompt


def test_penalties_and_logit_bias_reach_the_sampling():
    p = protocol.parse_completion({"prompt": "hi", "presence_penalty": 0.5, "frequency_penalty": -1,
                                   "logit_bias": {"7": -100, "3": 2.5}, "seed": 2 ** 63 - 1, "n": 3}, MODEL, TOK)
    s = protocol.sampling(p, 2)
    assert (s.presence_penalty, s.frequency_penalty, s.logit_bias) == (0.5, -1.0, ((3, 2.5), (7, -100.0)))
    assert s.seed == -(2 ** 63) + 1  # seed + 2 wraps within int64 instead of overflowing it
    assert [protocol.choice_seed(5, i) for i in range(3)] == [5, 6, 7]


@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "hi", "temperature": NaN}', None),
    (b'{"prompt": "hi", "temperature": Infinity}', None),
    (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", None),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
])
def test_hostile_bodies_give_400_not_500(raw, words):
    try:
        body = fields.parse_json_body(raw)
        protocol.parse_completion(body, MODEL, TOK)
    except ApiError as err:
        assert err.kind == "invalid_request"
        assert words is None or words in err.message
        assert words is not None or err.param in ("temperature", "max_tokens"), err.message
    else:
        pytest.fail("accepted")


def test_api_keys_file_rotation_and_loopback_rule(tmp_path, monkeypatch):
    from ingress import auth

    monkeypatch.setattr(auth, "RELOAD_S", 0.0)
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nold-key\n\n")
    keys = auth.ApiKeys(str(keys_file))
    assert keys.check("old-key", "10.0.0.5") is None
    assert "required" in keys.check(None, "127.0.0.1")  # with keys, loopback needs one too
    assert "not valid" in keys.check("old-key2", "127.0.0.1")
    keys_file.write_text("old-key\nnew-key\n")
    assert keys.allows("new-key") and keys.allows("old-key")
    keys_file.write_text("new-key\n")
    assert keys.allows("new-key") and not keys.allows("old-key")
    keys_file.write_text("")  # a half-written Secret update: the last good keys stay
    assert keys.allows("new-key")
    none = auth.ApiKeys(None)
    assert none.check(None, "127.0.0.1") is None and none.check(None, "::1") is None
    assert "loopback" in none.check(None, "192.168.1.9") and "loopback" in none.check("any", None)
    with pytest.raises(auth.KeyFileError):
        auth.ApiKeys(str(tmp_path / "missing"))
    assert auth.bearer("Bearer  abc ") == "abc" and auth.bearer("Basic abc") is None and auth.bearer("") is None
    assert auth.grpc_peer_host("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert auth.grpc_peer_host("ipv6:[::1]:5555") == "::1"
    assert auth.grpc_peer_host("ipv4:10.1.2.3:80") == "10.1.2.3"


def test_edge_middleware_strips_serve_control_headers():
    import asyncio

    from ingress.edge import StripControlHeaders, proxy_middlewares

    seen = {}

    async def app(scope, receive, send):
        seen.update(scope)

    scope = {"type": "http", "headers": [(b"x-request-timeout-seconds", b"0"), (b"host", b"x"),
                                         (b"X-Request-Disconnect-Disabled", b"?1")]}
    asyncio.run(StripControlHeaders(app)(scope, None, None))
    assert seen["headers"] == [(b"host", b"x")]
    assert proxy_middlewares()[0].cls is StripControlHeaders

# ruff: noqa: F811 - the fixtures imported from tests/integration/test_ingress_serve.py are parameters here
"""The base-model API on real Ray Serve (the fixtures of tests/integration/test_ingress_serve.py: the golden
model, random weights, the real tokenizer): prompt logprobs against the model's full forward, top logprobs, scoring with
max_tokens 0, structured output that always parses, tokenizer routes, and refusals naming the field.
"""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
import pytest
import requests

from tests.integration.test_ingress_serve import (  # noqa: F401 - fixtures
    ENGINE,
    grpc_client,
    openai_client,
    server,
    stub,
)

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 0.1  # bf16 activations (tests/test_engine.py's bound for engine vs full-forward logprobs)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
          "required": ["name", "ok", "color"], "additionalProperties": False}


def _reference_logprobs(golden, prompt: list[int]) -> np.ndarray:
    from grok1 import model

    config = golden.config.replace(engine=ENGINE)
    logits = model.full_forward(golden.params, config.model, np.asarray([prompt], np.int32),
                                block=ENGINE["moe_block_size"]).logits[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))  # [T, V]


def test_echo_scores_prompts_over_several_buckets_like_the_full_forward(server, golden, openai_client):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 30000, size=n).tolist() for n in (9, 27, 50)]  # buckets 16, 32, 64
    result = openai_client.completions.create(model=server.model, prompt=prompts, echo=True, logprobs=5,
                                              max_tokens=0)
    assert [c.index for c in result.choices] == [0, 1, 2] and result.usage.completion_tokens == 0
    for prompt, choice in zip(prompts, result.choices):
        lp = choice.logprobs
        assert choice.finish_reason == "length" and len(lp.tokens) == len(prompt)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        reference = _reference_logprobs(golden, prompt)
        expected = [reference[t - 1, prompt[t]] for t in range(1, len(prompt))]
        np.testing.assert_allclose(lp.token_logprobs[1:], expected, rtol=0, atol=LOGPROB_ATOL)
        for t in range(1, len(prompt)):
            top = list(lp.top_logprobs[t].values())
            assert len(top) <= 5 and top == sorted(top, reverse=True)
            assert abs(top[0] - reference[t - 1].max()) < LOGPROB_ATOL


def test_top_logprobs_of_generated_tokens(server, openai_client):
    for temperature in (0.0, 0.8):
        result = openai_client.completions.create(model=server.model, prompt="The answer is", max_tokens=8,
                                                  logprobs=5, temperature=temperature, seed=3)
        lp = result.choices[0].logprobs
        assert len(lp.tokens) == 8
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            values = list(top.values())
            assert values == sorted(values, reverse=True) and sum(math.exp(v) for v in values) <= 1 + 1e-3
            if token in top:  # the sampled token is reported with the value of its top entry
                assert abs(top[token] - logprob) < 1e-4
            else:
                assert logprob <= values[-1] + 1e-4
            if temperature == 0:
                assert token in top and values[0] == top[token]
    chat = openai_client.chat.completions.create(model=server.model, max_tokens=5, logprobs=True, top_logprobs=5,
                                                 messages=[{"role": "user", "content": "Say hi."}])
    content = chat.choices[0].logprobs.content
    assert content and all(len(entry.top_logprobs) == 5 for entry in content)
    assert all(entry.token == entry.top_logprobs[0].token for entry in content)  # greedy: the most likely


def test_json_schema_output_always_parses(server):
    import jsonschema

    texts = []
    for seed in range(4):  # 4 x n=5: 20 random-weight generations at temperature 1
        body = {"prompt": "Describe a thing as JSON:", "max_tokens": 80, "temperature": 1.0, "seed": seed * 5,
                "n": 5, "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}}
        response = requests.post(f"{server.http}/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        texts += [c["text"] for c in response.json()["choices"]]
        assert all(c["finish_reason"] == "stop" for c in response.json()["choices"])
    assert len(texts) == 20
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    # Any object: random weights would write one string for ever, so closing quotes and braces are made likely
    # (a bias, not a constraint: the grammar decides what is allowed).
    from grok1.tokenizer import Tokenizer

    pieces = Tokenizer.load().sentencepiece
    bias = {str(pieces.piece_to_id(p)): 6 for p in ('"', "}", '"}', "1")}
    chat = requests.post(f"{server.http}/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 120, "temperature": 1.0,
        "seed": 1, "logit_bias": bias, "response_format": {"type": "json_object"}})
    choice = chat.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["message"]["content"]), dict)


def test_regex_output_matches_over_http_and_grpc(server, grpc_client):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    body = {"prompt": "Code:", "max_tokens": 16, "temperature": 1.0, "n": 4,
            "structured_outputs": {"regex": pattern}}
    response = requests.post(f"{server.http}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert all(re.fullmatch(pattern, c["text"]) for c in response.json()["choices"])
    for seed in range(2):
        result = grpc_client.generate("Code:", max_tokens=16, temperature=1.0, seed=seed, regex=pattern)
        assert re.fullmatch(pattern, result.text), result.text
        parsed = grpc_client.generate("As JSON:", max_tokens=80, temperature=1.0, seed=seed, json_schema=SCHEMA)
        assert json.loads(parsed.text)["color"] in ("red", "green")


def test_grpc_top_and_prompt_logprobs(server, stub):
    from grok1_api.v1 import grok1_pb2 as pb

    reply = stub.Generate(pb.GenerateRequest(tokens=pb.TokenIds(ids=[5, 6, 7, 8]), max_tokens=3, logprobs=True,
                                             top_logprobs=3, prompt_logprobs=True))
    assert len(reply.top_logprobs) == 3 and all(len(t.top) == 3 for t in reply.top_logprobs)
    assert [t.top[0].token_id for t in reply.top_logprobs] == list(reply.token_ids)  # greedy
    assert list(reply.prompt_logprobs.token_ids) == [5, 6, 7, 8] and len(reply.prompt_logprobs.logprobs) == 3


@pytest.mark.parametrize("body, field", [
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "response_format": {"type": "yaml"}}, "response_format.type"),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                 "schema": {"type": "wat"}}}},
     "response_format.json_schema.schema"),
    ({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                 "schema": {"enum": []}}}},
     "response_format"),  # no JSON value satisfies it
    ({"prompt": "hi", "structured_outputs": {"regex": "a["}}, "structured_outputs"),
])
def test_bad_inputs_are_400_naming_the_field(server, body, field):
    response = requests.post(f"{server.http}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field, response.json()


def test_tokenizer_routes_in_vllms_shapes(server):
    tokens = requests.post(f"{server.http}/tokenize", json={"prompt": "Hello world", "return_token_strs": True},
                           timeout=60).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == ENGINE["max_len"]
    assert tokens["token_strs"] == ["▁Hello", "▁world"]
    text = requests.post(f"{server.http}/detokenize", json={"tokens": tokens["tokens"]}, timeout=60).json()
    assert text == {"prompt": "Hello world"}
    info = requests.get(f"{server.http}/tokenizer_info", timeout=60).json()
    eos = requests.post(f"{server.http}/tokenize", json={"prompt": info["eos_token"]}, timeout=60).json()
    assert eos["tokens"] == [2]
    bad = requests.post(f"{server.http}/detokenize", json={"tokens": [-1]}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"

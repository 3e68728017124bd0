"""The base-model API's request side, without Ray or a model: lists of prompts, scoring (max_tokens 0 with
echo), logprobs limits, /tokenize and /detokenize (vLLM's shapes), and the rendering of top and prompt
logprobs into OpenAI's shapes.
"""

from __future__ import annotations

import pytest

from ingress import protocol, tokenize
from ingress.errors import ApiError
from ingress.generation import Delta
from ingress.render import ChatRender, CompletionRender
from tests.serving.fakes import CharTokenizer

MODEL = protocol.ModelInfo("grok-1-tiny", max_len=64, vocab_size=1000, eos_token=2)


TOK = CharTokenizer()


def refused(parse, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, MODEL, TOK)
    assert info.value.kind == "invalid_request"
    return info.value


def test_a_list_of_prompts_gives_n_choices_each():
    p = protocol.parse_completion({"prompt": ["ab", [5, 6, 7]], "n": 3, "echo": True}, MODEL, TOK)
    assert p.prompts == [[97, 98], [5, 6, 7]] and p.choices == 6 and p.prompt == [97, 98]
    assert p.prompt_texts == ["ab", TOK.decode([5, 6, 7])]
    render = CompletionRender(p, "cmpl-1", "m")
    whole = [Delta(i, text=f"<{i}>", finish_reason="length") for i in range(6)]
    choices = render.response(whole, {})["choices"]
    # OpenAI's order: all choices of prompt 0, then of prompt 1
    assert [c["text"] for c in choices] == ["ab<0>", "ab<1>", "ab<2>"] + [TOK.decode([5, 6, 7]) + f"<{i}>"
                                                                         for i in (3, 4, 5)]
    assert [protocol.sampling(p, i % p.n).seed for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert protocol.parse_completion({"prompt": [[1, 2]]}, MODEL, TOK).prompts == [[1, 2]]
    assert refused(protocol.parse_completion, {"prompt": ["a"] * 20, "n": 4}).param == "n"
    assert refused(protocol.parse_completion, {"prompt": ["a", [5000]]}).param == "prompt"


def test_max_tokens_zero_scores_the_prompt_only_with_echo():
    p = protocol.parse_completion({"prompt": "abc", "max_tokens": 0, "echo": True, "logprobs": 1}, MODEL, TOK)
    assert p.score_only and protocol.router_max_tokens(p) == 1
    err = refused(protocol.parse_completion, {"prompt": "abc", "max_tokens": 0})
    assert err.param == "max_tokens" and "echo" in err.message
    assert refused(protocol.parse_chat, {"messages": [{"role": "user", "content": "x"}],
                                         "max_tokens": 0}).param == "max_tokens"
    body = {"prompt": "abc", "max_tokens": 0, "echo": True, "structured_outputs": {"regex": "a"}}
    pytest.importorskip("outlines_core")
    assert refused(protocol.parse_completion, body).param == "max_tokens"


@pytest.mark.parametrize("parse, body, field", [
    (protocol.parse_completion, {"prompt": "a", "logprobs": 21}, "logprobs"),
    (protocol.parse_completion, {"prompt": "a", "logprobs": -1}, "logprobs"),
    (protocol.parse_completion, {"prompt": "a", "logprobs": True}, "logprobs"),
    (protocol.parse_chat, {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    (protocol.parse_chat, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 5}, "top_logprobs"),
    (protocol.parse_chat, {"messages": [{"role": "user", "content": "x"}], "logprobs": 5}, "logprobs"),
])
def test_logprobs_limits_name_the_field(parse, body, field):
    assert refused(parse, body).param == field


def test_echo_renders_prompt_then_generated_logprobs():
    p = protocol.parse_completion({"prompt": "ab", "echo": True, "logprobs": 2, "max_tokens": 1}, MODEL, TOK)
    delta = Delta(0, text="c", token_ids=[99], logprobs=[-0.5], token_texts=["c"], text_offsets=[0],
                  top_logprobs=[[("d", -0.25, 100), ("c", -0.5, 99)]], finish_reason="length",
                  prompt_pieces=[("a", None, 0, [], 97), ("b", -1.5, 1, [("x", -0.1, 120), ("b", -1.5, 98)], 98)])
    lp = CompletionRender(p, "c", "m").response([delta], {})["choices"][0]["logprobs"]
    assert lp == {"tokens": ["a", "b", "c"], "token_logprobs": [None, -1.5, -0.5],
                  "top_logprobs": [None, {"x": -0.1, "b": -1.5}, {"d": -0.25, "c": -0.5}],
                  "text_offset": [0, 1, 2]}
    chat = protocol.parse_chat({"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                "top_logprobs": 2}, MODEL, TOK)
    content = ChatRender(chat, "c", "m").response([delta], {})["choices"][0]["logprobs"]["content"]
    assert [(e["token"], e["logprob"]) for e in content] == [("c", -0.5)]
    assert [(t["token"], t["logprob"]) for t in content[0]["top_logprobs"]] == [("d", -0.25), ("c", -0.5)]


def test_tokenize_and_detokenize_in_vllms_shapes():
    out = tokenize.tokenize({"prompt": "hi", "model": "grok-1-tiny"}, MODEL, TOK)
    assert out == {"count": 2, "max_model_len": 64, "tokens": [104, 105], "token_strs": None}
    out = tokenize.tokenize({"prompt": "hi", "add_special_tokens": True, "return_token_strs": True}, MODEL, TOK)
    assert out["token_strs"] == ["h", "i"] and out["tokens"] == [104, 105]
    chat = tokenize.tokenize({"messages": [{"role": "user", "content": "yo"}]}, MODEL, TOK)
    assert TOK.decode(chat["tokens"]) == protocol.render_chat([{"role": "user", "content": "yo"}])
    bare = tokenize.tokenize({"messages": [{"role": "user", "content": "yo"}], "add_generation_prompt": False},
                             MODEL, TOK)
    assert TOK.decode(bare["tokens"]) == "User: yo"
    assert tokenize.detokenize({"tokens": [104, 105]}, MODEL, TOK) == {"prompt": "hi"}
    assert tokenize.tokenize({"prompt": TOK.id_to_piece(2)}, MODEL, TOK)["tokens"] == [2]  # EOS's own text
    info = tokenize.tokenizer_info(MODEL, TOK)
    assert info["eos_token"] == TOK.id_to_piece(2) and info["model_max_length"] == 64
    for body, field in [({"prompt": 5}, "prompt"), ({"prompt": "a", "extra": 1}, "extra"),
                        ({"prompt": "a", "model": "x"}, "model")]:
        with pytest.raises(ApiError) as info:
            tokenize.tokenize(body, MODEL, TOK)
        assert info.value.param == field
    for body in ({"tokens": [1, 1000]}, {"tokens": "12"}, {"tokens": [1] * 65}, {"tokens": [True]}):
        with pytest.raises(ApiError) as info:
            tokenize.detokenize(body, MODEL, TOK)
        assert info.value.param == "tokens"


def test_the_engine_computes_logprobs_only_for_requests_that_ask():
    """A request that asks for no logprobs lets the engine skip them (grok1.engine_api.Sampling.logprobs)."""
    chat = {"messages": [{"role": "user", "content": "x"}]}
    asked = [
        (protocol.parse_completion({"prompt": "a"}, MODEL, TOK), False),
        (protocol.parse_completion({"prompt": "a", "logprobs": 0}, MODEL, TOK), True),
        (protocol.parse_completion({"prompt": "a", "logprobs": 2}, MODEL, TOK), True),
        (protocol.parse_chat(chat, MODEL, TOK), False),
        (protocol.parse_chat({**chat, "logprobs": False}, MODEL, TOK), False),
        (protocol.parse_chat({**chat, "logprobs": True}, MODEL, TOK), True),
    ]
    assert [protocol.sampling(params).logprobs for params, _ in asked] == [want for _, want in asked]

"""OpenAI-compatible response shapes (completions, chat, models, usage, logprobs) and server-sent events:
plain dicts and bytes, no Ray and no web framework. ingress/render.py fills them from a generation's deltas.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingress.protocol import ModelInfo


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(pieces: list[tuple[str, float | None, int]]) -> dict:
    """OpenAI's completions logprobs from (token text, logprob, text offset) triples."""
    return {"tokens": [p[0] for p in pieces], "token_logprobs": [p[1] for p in pieces],
            "top_logprobs": [None if p[1] is None else {p[0]: p[1]} for p in pieces],
            "text_offset": [p[2] for p in pieces]}


def chat_logprobs(pieces: list[tuple[str, float | None, int]]) -> dict:
    def entry(token, logprob):
        raw = list(token.encode("utf-8"))
        return {"token": token, "logprob": logprob, "bytes": raw}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(t, lp)]} for t, lp, _ in pieces]}


def completion_response(request_id: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def chat_response(request_id: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def sse(data) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` for the string '[DONE]')."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode("utf-8")


SSE_DONE = sse("[DONE]")


def models_response(model: "ModelInfo", created: int) -> dict:
    return {"object": "list", "data": [{"id": model.name, "object": "model", "created": created,
                                        "owned_by": "grok1-serve", "max_model_len": model.max_len}]}

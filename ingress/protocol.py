"""OpenAI-compatible request parsing and response shapes, with no Ray and no web framework (pure, tested alone).

Requests become a `GenerationParams`: token ids, sampling, stop strings, n, logprobs, echo. Range checks on
the prompt, max_tokens and sampling are the scheduler's own `validate` (one source of truth for what the
router accepts); what is text- or HTTP-specific is checked here. Every problem is an `ApiError` naming the
field.

Decisions, documented in the README:
- Chat: Grok-1 is a base model without a chat format, so messages are laid out as plain text
  (`render_chat`) ending in "Assistant:", and "\\nUser:" is added to the stop strings.
- n: up to MAX_N choices, each its own request to the router with seed + i (they batch together in the
  decode slots; the prompt is prefilled once per choice).
- logprobs: the engine computes the log-probability of each sampled token only, so `top_logprobs` holds just
  that token (whatever number was asked for) and echoed prompt tokens have logprob null.
- One prompt per request (a list of several prompts is refused); at most MAX_STOP stop strings.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ingress.errors import ApiError, invalid

MAX_N = 8
MAX_STOP = 4
MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 256  # capped at the context left after the prompt
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full 8,192-token context is ~60 KiB as JSON ids, less as text
CHAT_STOP = "\nUser:"
ROLES = {"system": None, "user": "User", "assistant": "Assistant"}


@dataclass
class ModelInfo:
    """What parsing needs to know about the served model."""

    name: str
    max_len: int
    vocab_size: int
    eos_token: int


@dataclass
class GenerationParams:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: int | None = None  # None: not asked for; k: asked for (we return the sampled token's only)
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    timeout_s: float | None = None
    ignore_eos: bool = False  # an extension (as in vLLM): generate exactly max_tokens tokens (benchmarks)
    prompt_text: str | None = None  # the prompt as text (for echo), when known


# ------------------------------------------------------------------------------------------- body


def parse_json_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError("too_large", f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise invalid(f"the request body is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise invalid(f"the request body is not valid JSON: {err.msg} (line {err.lineno} column {err.colno})") \
            from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


# ------------------------------------------------------------------------------------------- fields


def _number(body, name, default, lo=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name} must be a number, got {json.dumps(value)[:40]}", name)
    return float(value)


def _integer(body, name, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise invalid(f"{name} must be an integer, got {json.dumps(value)[:40]}", name)
    return value


def _boolean(body, name, default=False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{name} must be true or false, got {json.dumps(value)[:40]}", name)
    return value


def _stop(body) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise invalid(f"at most {MAX_STOP} stop strings, got {len(stops)}", "stop")
    return [s for s in stops if s]


def check_model(body: dict, model: ModelInfo) -> None:
    name = body.get("model")
    if name is not None and name != model.name:
        raise ApiError("model_not_found", f"the model {json.dumps(name)[:80]} does not exist; this server "
                                          f"serves {model.name!r} (GET /v1/models)", "model")


def _common(body: dict, model: ModelInfo, prompt: list[int], default_max_tokens: int) -> GenerationParams:
    check_model(body, model)
    max_tokens = _integer(body, "max_tokens", None)
    if max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = max(1, min(default_max_tokens, model.max_len - len(prompt)))
    n = _integer(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise invalid(f"n must be between 1 and {MAX_N}, got {n}", "n")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    timeout_s = _number(body, "timeout_s", None)
    if timeout_s is not None and timeout_s <= 0:
        raise invalid(f"timeout_s must be positive, got {timeout_s}", "timeout_s")
    params = GenerationParams(
        prompt=prompt, max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0),
        top_p=_number(body, "top_p", 1.0), top_k=_integer(body, "top_k", 0), seed=_integer(body, "seed", 0),
        stop=_stop(body), n=n, stream=_boolean(body, "stream"),
        include_usage=_boolean(stream_options, "include_usage"), timeout_s=timeout_s,
        ignore_eos=_boolean(body, "ignore_eos"))
    validate(params, model)
    return params


def validate(params: GenerationParams, model: ModelInfo) -> None:
    """The scheduler's checks (prompt, context, vocabulary, sampling ranges), as an ApiError."""
    from cluster.scheduler import InvalidRequest, Request, Scheduler
    from grok1.engine import Sampling

    scheduler = Scheduler(1, model.max_len, model.vocab_size, model.eos_token)
    try:
        scheduler.validate(Request("validate", params.prompt, params.max_tokens, Sampling(
            params.temperature, params.top_p, params.top_k, params.seed)))
    except InvalidRequest as err:
        raise invalid(str(err)) from None
    if not -(2 ** 63) <= params.seed < 2 ** 63:
        raise invalid("seed must fit in 64 bits", "seed")


def _prompt_ids(value, tokenizer, model: ModelInfo) -> tuple[list[int], str | None]:
    """A prompt given as text or as token ids (a list of one of either is accepted too)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return tokenizer.encode(value), value
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if any(not 0 <= t < model.vocab_size for t in value):
            raise invalid(f"token ids must be in [0, {model.vocab_size})", "prompt")
        return list(value), None
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise invalid("one prompt per request: send several prompts as separate requests", "prompt")
    raise invalid("prompt must be a string or a list of token ids", "prompt")


def parse_completion(body: dict, model: ModelInfo, tokenizer) -> GenerationParams:
    if "prompt" not in body:
        raise invalid("prompt is required", "prompt")
    prompt, text = _prompt_ids(body["prompt"], tokenizer, model)
    params = _common(body, model, prompt, DEFAULT_MAX_TOKENS)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS:
            raise invalid(f"logprobs must be an integer in [0, {MAX_LOGPROBS}]", "logprobs")
        params.logprobs = logprobs
    params.echo = _boolean(body, "echo")
    params.prompt_text = text if text is not None else (tokenizer.decode(prompt) if params.echo else None)
    return params


def render_chat(messages) -> str:
    """Grok-1 has no chat format; this plain layout is ours (README, "Serving"). In message order:

        <system message>\n\n
        User: <user message>\n\n
        Assistant: <assistant message>\n\n
        ...
        Assistant:

    (contents stripped of surrounding whitespace; the model continues after "Assistant:").
    """
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    parts = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise invalid(f"messages[{k}] must be an object with role 'system', 'user' or 'assistant'",
                          "messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise invalid(f"messages[{k}].content: only text parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise invalid(f"messages[{k}].content must be a string", "messages")
        speaker = ROLES[message["role"]]
        parts.append(f"{content.strip()}\n\n" if speaker is None else f"{speaker}: {content.strip()}\n\n")
    return "".join(parts) + "Assistant:"


def parse_chat(body: dict, model: ModelInfo, tokenizer) -> GenerationParams:
    text = render_chat(body.get("messages"))
    prompt = tokenizer.encode(text)
    params = _common(body, model, prompt, DEFAULT_CHAT_MAX_TOKENS)
    params.stop = params.stop + [CHAT_STOP] if CHAT_STOP not in params.stop else params.stop
    if _boolean(body, "logprobs"):
        top = _integer(body, "top_logprobs", 0)
        if not 0 <= top <= MAX_LOGPROBS:
            raise invalid(f"top_logprobs must be in [0, {MAX_LOGPROBS}]", "top_logprobs")
        params.logprobs = top
    params.prompt_text = text
    return params


# ------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


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


def models_response(model: ModelInfo, created: int) -> dict:
    return {"object": "list", "data": [{"id": model.name, "object": "model", "created": created,
                                        "owned_by": "grok1-serve", "max_model_len": model.max_len}]}

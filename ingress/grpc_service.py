"""The grok1.v1 gRPC service (proto/grok1_api/v1/grok1.proto): the methods Serve's gRPC proxy calls by name on
the ingress deployment (ingress/app.py's `Grok1Ingress` inherits them from `GrpcService`).

A GenerateRequest is laid out as a completions body and parsed by ingress/protocol.py, so both protocols
accept and refuse exactly the same requests; every failure sets the status code of its `ApiError`.
"""

from __future__ import annotations

import asyncio
import json

from grok1_api.v1 import grok1_pb2 as pb
from ingress import protocol
from ingress.auth import bearer, grpc_peer_host
from ingress.errors import ApiError, from_exception
from ingress.fields import check_text
from ingress.generation import Generation
from ingress.structured import JSON_OBJECT_SCHEMA

MAX_CLIENT_REQUEST_ID = 128  # characters of a gRPC client's request_id (echoed back, never used as the router's)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty")


class GrpcService:
    """gRPC methods over the ingress replica's state: `router`, `tokenizer`, `model` (protocol.ModelInfo),
    `options` (ServingConfig), `keys` (auth.ApiKeys), `counts`, `metrics`, `_health(probe)` and
    `_router_channel()` (the subscription to the router requests stream through)."""

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        generation, params, request_id = await self._grpc_start(request, grpc_context)
        try:
            whole = (await generation.collect())[0]
        except Exception as err:  # noqa: BLE001
            self._grpc_fail(grpc_context, err)
        finally:
            generation.close()
        self.counts["grpc", "OK"] += 1
        return pb.GenerateResponse(
            request_id=request_id, text=whole.text, token_ids=whole.token_ids,
            logprobs=whole.logprobs if params.logprobs is not None else [], finish_reason=whole.finish_reason,
            usage=self._grpc_usage(generation), model=self.model.name, top_logprobs=_top_messages(whole),
            prompt_logprobs=_prompt_message(whole))

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context):
        generation, params, request_id = await self._grpc_start(request, grpc_context)
        self.counts["grpc", "OK"] += 1
        try:
            async for delta in generation.deltas():
                yield pb.GenerateChunk(
                    request_id=request_id, text=delta.text, token_ids=delta.token_ids,
                    logprobs=delta.logprobs if params.logprobs is not None else [],
                    finish_reason=delta.finish_reason or "",
                    usage=self._grpc_usage(generation) if delta.finish_reason else None,
                    top_logprobs=_top_messages(delta), prompt_logprobs=_prompt_message(delta))
        except Exception as err:  # noqa: BLE001
            self._grpc_fail(grpc_context, err)
        finally:
            generation.close()

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context) -> pb.TokenizeResponse:
        self._grpc_authorize(grpc_context)
        try:
            text = check_text(request.text, "text", self.model.max_prompt_chars)
        except ApiError as err:
            self._grpc_fail(grpc_context, err)
        ids = await asyncio.to_thread(self.tokenizer.encode, text)
        return pb.TokenizeResponse(token_ids=ids, pieces=[self.tokenizer.id_to_piece(i) for i in ids])

    async def Detokenize(self, request: pb.DetokenizeRequest, grpc_context) -> pb.DetokenizeResponse:
        self._grpc_authorize(grpc_context)
        ids = list(request.token_ids)
        if len(ids) > self.model.max_len:
            self._grpc_fail(grpc_context, protocol.invalid(
                f"at most {self.model.max_len} token ids, got {len(ids)}", "token_ids"))
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            self._grpc_fail(grpc_context, protocol.invalid(
                f"token ids must be in [0, {self.model.vocab_size}), got {bad[:5]}", "token_ids"))
        return pb.DetokenizeResponse(text=await asyncio.to_thread(self.tokenizer.decode, ids))

    async def Health(self, request: pb.HealthRequest, grpc_context) -> pb.HealthResponse:
        if self.options.auth_health:
            self._grpc_authorize(grpc_context)
        health = await self._health(probe=request.probe)
        if not health["ok"]:
            self._grpc_fail(grpc_context, ApiError("unavailable", f"{health['state']}: {health['detail']}"))
        return pb.HealthResponse(ok=True, state=health["state"], detail=health["detail"], model=self.model.name)

    # ------------------------------------------------------------------------------------ helpers
    async def _grpc_start(self, request: pb.GenerateRequest, grpc_context):
        """Authorize, parse and start: (generation, params, request_id), or the call fails with its status."""
        self._grpc_authorize(grpc_context)
        try:
            params = await asyncio.to_thread(self._grpc_params, request)
            request_id = request.request_id or protocol.new_id("gen")
            generation = await Generation(self.router, self.tokenizer, params, request_id, self.metrics,
                                          self._router_channel(), self.options.stream_interval).start()
        except Exception as err:  # noqa: BLE001
            self._grpc_fail(grpc_context, err)
        return generation, params, request_id

    def _grpc_authorize(self, grpc_context) -> None:
        metadata = dict(grpc_context.invocation_metadata() or ())
        why = self.keys.check(bearer(metadata.get("authorization")), grpc_peer_host(grpc_context.peer()))
        if why is not None:
            self._grpc_fail(grpc_context, ApiError("unauthenticated", why))

    def _grpc_params(self, request: pb.GenerateRequest) -> protocol.GenerationParams:
        if len(request.request_id) > MAX_CLIENT_REQUEST_ID:
            raise protocol.invalid(f"request_id is over {MAX_CLIENT_REQUEST_ID} characters", "request_id")
        body = {"max_tokens": request.max_tokens if request.HasField("max_tokens") else None,
                "stop": list(request.stop), "model": request.model or None,
                "timeout_s": request.timeout_s if request.HasField("timeout_s") else None,
                "ignore_eos": request.ignore_eos}
        sampling = request.sampling
        for name in SAMPLING_FIELDS:
            if sampling.HasField(name):
                body[name] = getattr(sampling, name)
        if sampling.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias.items()}
        if request.HasField("top_logprobs"):
            body["logprobs"] = request.top_logprobs
        if request.prompt_logprobs:
            body["echo"] = True
        if request.HasField("structured_output"):
            body["structured_outputs"] = _structured(request.structured_output)
        which = request.WhichOneof("prompt")
        if which is None:
            raise ApiError("invalid_request", "the prompt is empty (set text or tokens)", "prompt")
        body["prompt"] = request.text if which == "text" else list(request.tokens.ids)
        params = protocol.parse_completion(body, self.model, self.tokenizer)
        params.logprobs = (request.top_logprobs if request.HasField("top_logprobs") else 0) \
            if request.logprobs or request.prompt_logprobs else None
        return params

    def _grpc_usage(self, generation: Generation) -> pb.Usage:
        p, c = generation.prompt_tokens, generation.completion_tokens
        return pb.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def _grpc_fail(self, grpc_context, err: BaseException):
        """Set the status code and message, then raise (Serve's proxy sends that status to the client)."""
        error = from_exception(err)
        self.counts["grpc", error.grpc_code.name] += 1
        grpc_context.set_code(error.grpc_code)
        grpc_context.set_details(error.message)
        raise error


def _structured(message: pb.StructuredOutput) -> dict:
    """As the HTTP extension `structured_outputs` (parsed and refused by the same code)."""
    which = message.WhichOneof("kind")
    if which == "regex":
        return {"regex": message.regex}
    if which == "json_schema":
        try:
            return {"json": json.loads(message.json_schema)}
        except ValueError as err:
            raise protocol.invalid(f"structured_output.json_schema is not JSON: {err}"[:200],
                                   "structured_output.json_schema") from None
    if which == "json_object" and message.json_object:
        return {"json": JSON_OBJECT_SCHEMA}
    raise protocol.invalid("structured_output must set regex, json_schema or json_object", "structured_output")


def _tops(tops) -> list[pb.TopLogprobs]:
    return [pb.TopLogprobs(top=[pb.TopLogprob(token_id=i, token=t, logprob=lp) for t, lp, i in top])
            for top in tops]


def _top_messages(delta) -> list[pb.TopLogprobs]:
    return _tops(delta.top_logprobs) if any(delta.top_logprobs) else []


def _prompt_message(delta) -> pb.PromptLogprobs | None:
    pieces = delta.prompt_pieces
    if pieces is None:
        return None
    return pb.PromptLogprobs(token_ids=[p[4] for p in pieces], logprobs=[p[1] for p in pieces[1:]],
                             top=_tops([p[3] for p in pieces[1:]]) if any(p[3] for p in pieces) else [])

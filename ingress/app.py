"""The Ray Serve application: one ingress deployment serving OpenAI-compatible HTTP and the grok1.v1 gRPC API.

    serve run ingress.app:build_app config=configs/grok-1-tiny.yaml ep=2     # or: grok1 serve --config ...

1. Each ingress replica starts its own router actor (cluster/router.py), which starts its shard group and
   loads the weights in the background: one ingress replica = one model replica (router + shard group), and
   `num_replicas` > 1 scales out data-parallel, with Serve's proxies spreading requests over replicas.
2. HTTP arrives through Serve's HTTP proxy into the FastAPI routes below; gRPC through Serve's gRPC proxy,
   which calls the method of the same name (`Generate`, `GenerateStream`, ...) on this class.
3. Both parse into `GenerationParams` (ingress/protocol.py), run a `Generation` (ingress/generation.py) on the
   router, and render its deltas: SSE chunks, JSON, or protobuf messages.
4. Until the weights are loaded the router refuses requests as Unavailable: HTTP 503, gRPC UNAVAILABLE.
   `/health` is 200 only when a 1-token generation works. Serve's own health check fails the replica when its
   router has failed or died, so Serve replaces both.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (`request: Request`) at
# runtime, through Serve's class wrapper.
import asyncio
import collections
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from grok1_api.v1 import grok1_pb2 as pb
from ingress import metrics, protocol
from ingress.auth import ApiKeys, bearer, grpc_peer_host, read_keys
from ingress.errors import ApiError, from_exception
from ingress.generation import Generation
from ingress.render import ChatRender, CompletionRender

GRPC_SERVICER = "grok1_api.v1.grok1_pb2_grpc.add_Grok1ServiceServicer_to_server"
HEALTH_PROBE_TIMEOUT_S = 30
MAX_CLIENT_REQUEST_ID = 128  # characters of a gRPC client's request_id (echoed back, never used as the router's)


@dataclass
class IngressOptions:
    """build_app's arguments (`serve run ingress.app:build_app key=value ...` passes them as strings)."""

    config: str = "configs/grok-1-tiny.yaml"
    checkpoint: str | None = None  # default: the config's checkpoint.path
    ep: int = 2
    tp: int = 1
    placement_strategy: str = "PACK"
    random_if_missing: bool = False
    max_queue: int = 256
    tokenizer: str | None = None
    backend: str = "ray"  # "local": the engine inside the router's process (one device; tests)
    num_replicas: int = 1  # model replicas (each one router + one shard group)
    use_gpus: bool = False
    api_key_file: str | None = None  # one key per line; None: only loopback clients are served (ingress/auth.py)
    auth_health: bool = False  # /health and gRPC Health need a key too
    auth_metrics: bool = False  # /metrics needs a key too
    body_timeout_s: float = 30.0  # the time a client has to send its whole request body (408 after it)

    @classmethod
    def from_args(cls, args: dict) -> "IngressOptions":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown build_app argument(s) {unknown}; known: {sorted(known)}")
        values = {}
        for name, value in args.items():
            kind = known[name].type
            if value is None or kind is not bool and kind is not int and value in ("", "none", "None"):
                values[name] = None
            elif kind is bool:
                values[name] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            elif kind is int:
                values[name] = int(value)
            elif kind is float:
                values[name] = float(value)
            else:
                values[name] = str(value)
        options = cls(**values)
        if options.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                             f"got {options.placement_strategy!r}")
        if options.backend not in ("ray", "local"):
            raise ValueError(f"backend must be 'ray' or 'local', got {options.backend!r}")
        return options

    def load_config(self):
        from grok1.config import ConfigError, load_config

        config = load_config(self.config)
        if self.checkpoint:
            config = config.replace(checkpoint={"path": str(Path(self.checkpoint).resolve())})
        if not config.checkpoint.path:
            raise ConfigError(f"{self.config}: checkpoint.path is not set; pass checkpoint=DIR")
        return config


app = FastAPI(title="grok1-serve", docs_url=None, redoc_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = {404: "not_found", 413: "too_large"}.get(exc.status_code, "invalid_request")
    error = ApiError(kind, f"{request.method} {request.url.path}: {exc.detail}")
    return JSONResponse(error.body(), status_code=exc.status_code)


def _error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.retriable else None
    return JSONResponse(err.body(), status_code=err.http_status, headers=headers)


async def _read_body(request: Request, timeout_s: float) -> dict:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > protocol.MAX_BODY_BYTES:
        raise ApiError("too_large", f"the request body is {length} bytes; the limit is {protocol.MAX_BODY_BYTES}")

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > protocol.MAX_BODY_BYTES:
                raise ApiError("too_large", f"the request body is over the limit of {protocol.MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:  # a client trickling its body must not hold a replica's request slot for ever
        raw = await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError("body_timeout", f"the request body did not arrive within {timeout_s:g}s") from None
    return protocol.parse_json_body(raw)


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=10, health_check_timeout_s=60)
@serve.ingress(app)
class Grok1Ingress:
    def __init__(self, options: dict):
        from cluster.router import start_router
        from grok1.tokenizer import Tokenizer

        self.options = IngressOptions(**options)
        config = self.options.load_config()
        self.config = config
        self.model = protocol.ModelInfo(config.name, config.engine.max_len, config.model.vocab_size,
                                        config.model.eos_token)
        self.tokenizer = Tokenizer.load(self.options.tokenizer or config.tokenizer, config.checkpoint.path)
        self.created = int(time.time())
        self.counts: collections.Counter = collections.Counter()
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests of the class itself)
            self.replica = f"pid{os.getpid()}"
        self.keys = ApiKeys(self.options.api_key_file)
        self.router = start_router(config, checkpoint=config.checkpoint.path, ep=self.options.ep, tp=self.options.tp,
                                   placement_strategy=self.options.placement_strategy,
                                   max_queue=self.options.max_queue, backend=self.options.backend,
                                   use_gpus=self.options.use_gpus)

    # ------------------------------------------------------------------------------------ Serve hooks
    async def check_health(self):
        """Serve's health check: fail when the router died or gave up (Serve then replaces this replica)."""
        health = await self.router.health.remote(probe=False)
        if health["state"] == "failed":
            raise RuntimeError(f"the router failed: {health['detail']}")

    async def router_handle(self):
        """The router actor (tests read its state through it)."""
        return self.router

    # ------------------------------------------------------------------------------------ HTTP
    @app.get("/v1/models")
    async def http_models(self, request: Request):
        if denied := self._http_denied(request):
            return denied
        return protocol.models_response(self.model, self.created)

    @app.get("/health")
    async def http_health(self, request: Request):
        if self.options.auth_health and (denied := self._http_denied(request)):
            return denied
        health = await self._health(probe=True)
        return JSONResponse({**health, "model": self.model.name}, status_code=200 if health["ok"] else 503)

    @app.get("/metrics")
    async def http_metrics(self, request: Request):
        if self.options.auth_metrics and (denied := self._http_denied(request)):
            return denied
        stats = await self.router.stats.remote()
        text = metrics.render(stats, self.model.name, self.replica, dict(self.counts))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def http_completions(self, request: Request):
        return await self._http_generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def http_chat(self, request: Request):
        return await self._http_generate(request, chat=True)

    async def _http_generate(self, request: Request, chat: bool):
        if denied := self._http_denied(request):
            return denied
        try:
            body = await _read_body(request, self.options.body_timeout_s)
            parse = protocol.parse_chat if chat else protocol.parse_completion
            # Tokenising is CPU work: off the event loop, so other streams of this replica keep flowing.
            params = await asyncio.to_thread(parse, body, self.model, self.tokenizer)
            request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
            generation = await Generation(self.router, self.tokenizer, params, request_id).start()
        except Exception as err:  # noqa: BLE001 - every failure becomes an OpenAI error with its status
            error = from_exception(err)
            self.counts["http", error.http_status] += 1
            return _error_response(error)
        self.counts["http", 200] += 1
        render = ChatRender(params, request_id, self.model.name) if chat else \
            CompletionRender(params, request_id, self.model.name)
        if params.stream:
            return StreamingResponse(self._sse(generation, render), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            whole = await generation.collect()
        except Exception as err:  # noqa: BLE001
            return _error_response(from_exception(err))
        finally:
            generation.close()
        return render.response(whole, protocol.usage(generation.prompt_tokens, generation.completion_tokens))

    async def _sse(self, generation: Generation, render):
        try:
            for chunk in render.first_chunks():
                yield protocol.sse(chunk)
            finished = 0
            async for delta in generation.deltas():
                finished += delta.finish_reason is not None
                last = finished == len(generation.choices) and delta.finish_reason is not None
                usage = protocol.usage(generation.prompt_tokens, generation.completion_tokens)
                yield protocol.sse(render.chunk(delta, usage if last and not render.params.include_usage else None))
            if render.params.include_usage:
                yield protocol.sse(render.usage_chunk(
                    protocol.usage(generation.prompt_tokens, generation.completion_tokens)))
        except Exception as err:  # noqa: BLE001 - the status line is sent already: an error event instead
            yield protocol.sse(from_exception(err).body())
        finally:
            generation.close()  # a client that went away: its router requests are cancelled here
        yield protocol.SSE_DONE

    # ------------------------------------------------------------------------------------ gRPC
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        self._grpc_authorize(grpc_context)
        try:
            params = await asyncio.to_thread(self._grpc_params, request)
            request_id = request.request_id or protocol.new_id("gen")
            generation = await Generation(self.router, self.tokenizer, params, request_id).start()
            try:
                whole = (await generation.collect())[0]
            finally:
                generation.close()
        except Exception as err:  # noqa: BLE001
            self._grpc_fail(grpc_context, err)
        self.counts["grpc", "OK"] += 1
        return pb.GenerateResponse(
            request_id=request_id, text=whole.text, token_ids=whole.token_ids,
            logprobs=whole.logprobs if params.logprobs is not None else [], finish_reason=whole.finish_reason,
            usage=self._grpc_usage(generation), model=self.model.name)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context):
        self._grpc_authorize(grpc_context)
        try:
            params = await asyncio.to_thread(self._grpc_params, request)
            request_id = request.request_id or protocol.new_id("gen")
            generation = await Generation(self.router, self.tokenizer, params, request_id).start()
        except Exception as err:  # noqa: BLE001
            self._grpc_fail(grpc_context, err)
        self.counts["grpc", "OK"] += 1
        try:
            async for delta in generation.deltas():
                yield pb.GenerateChunk(
                    request_id=request_id, text=delta.text, token_ids=delta.token_ids,
                    logprobs=delta.logprobs if params.logprobs is not None else [],
                    finish_reason=delta.finish_reason or "",
                    usage=self._grpc_usage(generation) if delta.finish_reason else None)
        except Exception as err:  # noqa: BLE001
            self._grpc_fail(grpc_context, err)
        finally:
            generation.close()

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context) -> pb.TokenizeResponse:
        self._grpc_authorize(grpc_context)
        try:
            text = protocol.check_text(request.text, "text", self.model.max_prompt_chars)
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
    async def _health(self, probe: bool) -> dict:
        import asyncio

        try:
            return await asyncio.wait_for(self.router.health.remote(probe=probe), HEALTH_PROBE_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - an unreachable router is an unhealthy replica
            return {"ok": False, "state": "unreachable", "detail": f"{type(err).__name__}: {err}"[:500]}

    def _http_denied(self, request: Request) -> JSONResponse | None:
        """A 401 response unless the request carries an accepted key (or, without keys, comes from loopback)."""
        client = request.client.host if request.client else None
        why = self.keys.check(bearer(request.headers.get("authorization")), client)
        if why is None:
            return None
        self.counts["http", 401] += 1
        return JSONResponse(ApiError("unauthenticated", why).body(), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

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
        for name in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty"):
            if sampling.HasField(name):
                body[name] = getattr(sampling, name)
        if sampling.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias.items()}
        which = request.WhichOneof("prompt")
        if which is None:
            raise ApiError("invalid_request", "the prompt is empty (set text or tokens)", "prompt")
        body["prompt"] = request.text if which == "text" else list(request.tokens.ids)
        params = protocol.parse_completion(body, self.model, self.tokenizer)
        params.logprobs = 1 if request.logprobs else None
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


# ---------------------------------------------------------------------------------------- the builder


def build_app(args: dict) -> serve.Application:
    """The Serve application (`serve run ingress.app:build_app config=... ep=2`); see IngressOptions."""
    options = IngressOptions.from_args(dict(args))
    config = options.load_config()
    checkpoint = Path(config.checkpoint.path)
    if options.random_if_missing:
        from grok1.loading import ensure_random_checkpoint

        ensure_random_checkpoint(config, checkpoint)
    options.checkpoint = str(checkpoint.resolve())
    options.config = str(Path(options.config).resolve())
    if options.api_key_file:
        options.api_key_file = str(Path(options.api_key_file).resolve())
        read_keys(options.api_key_file)  # a missing or empty key file fails here, not in every replica
    if not options.body_timeout_s > 0:
        raise ValueError(f"body_timeout_s must be positive, got {options.body_timeout_s}")
    slots = config.engine.max_slots
    return Grok1Ingress.options(
        num_replicas=options.num_replicas,
        # Serve queues beyond this; the router's queue is the limit.
        max_ongoing_requests=options.max_queue + slots + 32,
        max_queued_requests=-1,
    ).bind(asdict(options))


def serve_options(http_host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000) -> dict:
    """Keyword arguments for `serve.start`: HTTP and gRPC proxies with the grok1.v1 servicer."""
    return {"http_options": {"host": http_host, "port": http_port},
            "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}}



"""The Ray Serve application: one ingress deployment serving OpenAI-compatible HTTP and the grok1.v1 gRPC API.

    serve run ingress.app:build_app config=configs/grok-1-tiny.yaml ep=2     # or: grok1 serve --config ...

1. Each ingress replica starts its own router actor (cluster/router.py), which starts its shard group and
   loads the weights in the background: one ingress replica = one model replica (router + shard group), and
   `num_replicas` > 1 scales out data-parallel, with Serve's proxies spreading requests over replicas.
2. HTTP arrives through Serve's HTTP proxy into the FastAPI routes below; gRPC through Serve's gRPC proxy,
   which calls the method of the same name (`Generate`, `GenerateStream`, ...) on this class: those are
   ingress/grpc_service.py's.
3. Both parse into `GenerationParams` (ingress/protocol.py), run a `Generation` (ingress/generation.py) on the
   router, and render its deltas: SSE chunks, JSON, or protobuf messages.
4. Readiness means loaded: the constructor returns only once the router has loaded the weights and a 1-token
   generation works (bounded by start_timeout_s; past it, or on a failed start, it raises and Serve retries
   the replica). Serve marks a replica RUNNING, and routes to it, only when its constructor has returned, and
   an application is RUNNING (what a RayService upgrade waits for before switching traffic) only when all its
   replicas are; so no traffic reaches a loading replica. (A check_health that fails while loading would not
   do: Serve kills a replica whose health check fails.) A router that is later recovering refuses requests
   as Unavailable: HTTP 503, gRPC UNAVAILABLE. `/health` is 200 only when a 1-token generation works. Serve's
   own health check fails the replica when its router has failed or died, so Serve replaces both.
5. The settings are one `ServingConfig` (ingress/serving_config.py): build_app's arguments only override it.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (`request: Request`) at
# runtime, through Serve's class wrapper.
import asyncio
import collections
import os
import time
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.channel import RouterChannel
from cluster.router import placement_name, start_router
from grok1.tokenizer import Tokenizer
from ingress import metrics, protocol, responses, tokenize
from ingress.auth import ApiKeys, bearer, read_keys
from ingress.errors import ApiError, from_exception
from ingress.fields import MAX_BODY_BYTES, parse_json_body
from ingress.generation import Generation
from ingress.grpc_service import GrpcService
from ingress.ray_export import ray_export
from ingress.render import ChatRender, CompletionRender
from ingress.serving_config import ServingConfig
from workers.group import remove_placement_group_named

SHUTDOWN_MARGIN_S = 30  # beyond the drain grace: the router's shutdown and removing its workers
GRPC_SERVICER = "grok1_api.v1.grok1_pb2_grpc.add_Grok1ServiceServicer_to_server"


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
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError("too_large", f"the request body is {length} bytes; the limit is {MAX_BODY_BYTES}")

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > MAX_BODY_BYTES:
                raise ApiError("too_large", f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:  # a client trickling its body must not hold a replica's request slot for ever
        raw = await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError("body_timeout", f"the request body did not arrive within {timeout_s:g}s") from None
    return parse_json_body(raw)


def wait_loaded(router, start_timeout_s: float, probe_timeout_s: float) -> None:
    """Block until `router` has loaded its weights and a 1-token generation works; raise (with what went wrong)
    when it fails to start, or is not ready within start_timeout_s."""
    ray.get(router.wait_ready.remote(start_timeout_s), timeout=start_timeout_s + 30)
    health = ray.get(router.health.remote(probe=True), timeout=probe_timeout_s + 30)
    if not health["ok"]:
        raise RuntimeError(f"the replica loaded but its 1-token generation failed: {health['detail']}")


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=10, health_check_timeout_s=60)
@serve.ingress(app)
class Grok1Ingress(GrpcService):
    def __init__(self, options: dict):
        self.options = ServingConfig.of(options)
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
        self.metrics = metrics.ReplicaMetrics(config.name, self.replica, config.engine.max_len,
                                              ingress_counts=self.counts, export=ray_export(
                                                  self.options.ray_metrics, config.name, self.replica,
                                                  config.engine.max_len))
        self.router_name = f"grok1-router-{self.replica}"  # names its placement group too (one per replica)
        self.router = start_router(config, self.options.replica(), checkpoint=config.checkpoint.path,
                                   name=self.router_name)
        self._channels: dict[asyncio.AbstractEventLoop, RouterChannel] = {}
        try:
            wait_loaded(self.router, self.options.start_timeout_s, self.options.health_timeout_s)
        except BaseException:
            ray.kill(self.router)  # Serve retries this replica with a new router: this one must not linger
            raise

    def _router_channel(self) -> RouterChannel:
        """The subscription this replica's requests stream through: one per event loop (its asyncio objects
        belong to one), in practice one, Serve's user-code loop."""
        loop = asyncio.get_running_loop()
        channel = self._channels.get(loop)
        if channel is None:
            channel = self._channels[loop] = RouterChannel(self.router)
        return channel

    # ------------------------------------------------------------------------------------ Serve hooks
    async def check_health(self):
        """Serve's health check: fail when the router died or gave up (Serve then replaces this replica)."""
        try:
            health = await self.router.health.remote(probe=False)
        except ray.exceptions.RayActorError:
            # The router died with its placement group still reserved (Ray keeps it for the job): free it.
            remove_placement_group_named(placement_name(self.router_name))
            raise
        await self._update_metrics()  # every health check period: the Ray export's gauges stay current
        if health["state"] == "failed":
            raise RuntimeError(f"the router failed: {health['detail']}")

    async def __del__(self):
        """Serve's graceful shutdown (scale-down, redeploy, upgrade), once it has stopped routing here and its
        ongoing requests are done or it gave up waiting: drain the router (whatever still runs gets the grace
        period, then the retriable error) and shut it down, so its workers and placement group go too."""
        router = getattr(self, "router", None)  # None: the constructor never got that far
        if router is None:
            return
        try:
            await asyncio.wait_for(router.drain.remote(self.options.drain_grace_s), self.options.drain_grace_s + 20)
            await asyncio.wait_for(router.shutdown.remote(), 20)
        except Exception:  # noqa: BLE001 - the router is gone already: its group may be left, remove it
            remove_placement_group_named(placement_name(self.router_name))

    async def router_handle(self):
        """The router actor (tests read its state through it)."""
        return self.router

    # ------------------------------------------------------------------------------------ HTTP
    @app.get("/v1/models")
    async def http_models(self, request: Request):
        if denied := self._http_denied(request):
            return denied
        return responses.models_response(self.model, self.created)

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
        await self._update_metrics()
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def http_tokenize(self, request: Request):
        return await self._http_call(request, tokenize.tokenize)

    @app.get("/tokenizer_info")
    async def http_tokenizer_info(self, request: Request):
        if denied := self._http_denied(request):
            return denied
        return tokenize.tokenizer_info(self.model, self.tokenizer)

    @app.post("/detokenize")
    async def http_detokenize(self, request: Request):
        return await self._http_call(request, tokenize.detokenize)

    async def _http_call(self, request: Request, handler):
        """A JSON body through `handler(body, model, tokenizer)` (CPU work: off the event loop)."""
        if denied := self._http_denied(request):
            return denied
        try:
            body = await _read_body(request, self.options.body_timeout_s)
            result = await asyncio.to_thread(handler, body, self.model, self.tokenizer)
        except Exception as err:  # noqa: BLE001
            error = from_exception(err)
            self.counts["http", error.http_status] += 1
            return _error_response(error)
        self.counts["http", 200] += 1
        return result

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
            generation = await Generation(self.router, self.tokenizer, params, request_id, self.metrics,
                                          self._router_channel(), self.options.stream_interval).start()
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
        return render.response(whole, responses.usage(generation.prompt_tokens, generation.completion_tokens))

    async def _sse(self, generation: Generation, render):
        try:
            for chunk in render.first_chunks():
                yield responses.sse(chunk)
            finished = 0
            async for delta in generation.deltas():
                finished += delta.finish_reason is not None
                last = finished == len(generation.choices) and delta.finish_reason is not None
                usage = responses.usage(generation.prompt_tokens, generation.completion_tokens)
                yield responses.sse(render.chunk(delta, usage if last and not render.params.include_usage else None))
            if render.params.include_usage:
                yield responses.sse(render.usage_chunk(
                    responses.usage(generation.prompt_tokens, generation.completion_tokens)))
        except Exception as err:  # noqa: BLE001 - the status line is sent already: an error event instead
            yield responses.sse(from_exception(err).body())
        finally:
            generation.close()  # a client that went away: its router requests are cancelled here
        yield responses.SSE_DONE

    # ------------------------------------------------------------------------------------ helpers
    async def _update_metrics(self) -> None:
        try:
            stats = await asyncio.wait_for(self.router.stats.remote(), self.options.health_timeout_s)
        except Exception:  # noqa: BLE001 - an unreachable router: its last figures stay, `up` from health
            return
        self.metrics.update(stats)

    async def _health(self, probe: bool) -> dict:
        try:
            return await asyncio.wait_for(self.router.health.remote(probe=probe), self.options.health_timeout_s)
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


# ---------------------------------------------------------------------------------------- the builder


def build_app(args: dict) -> serve.Application:
    """The Serve application (`serve run ingress.app:build_app config=... ep=2`): `args` override the
    ServingConfig's defaults (or are one already: grok1 serve). Not annotated as the model, so Serve passes the
    dict through and a bad value raises ServingConfigError, one line naming each field, as from the CLI."""
    options = ServingConfig.of(args)
    config = options.load_config()
    checkpoint = Path(config.checkpoint.path)
    if options.random_if_missing:
        from grok1.loading import ensure_random_checkpoint  # loads JAX: only the builder's process needs it

        ensure_random_checkpoint(config, checkpoint)
    options = options.resolved(checkpoint)
    if options.api_key_file:
        read_keys(options.api_key_file)  # a missing or empty key file fails here, not in every replica
    options.replica().group_spec(config, options.checkpoint)  # so does a mesh the model does not allow
    slots = config.engine.max_slots
    return Grok1Ingress.options(
        num_replicas=options.num_replicas,
        # Serve queues beyond this; the router's queue is the limit.
        max_ongoing_requests=options.max_queue + slots + 32,
        max_queued_requests=-1,
        # Serve waits this long for ongoing requests and __del__ (the router's drain) before it kills us.
        graceful_shutdown_timeout_s=options.drain_grace_s + SHUTDOWN_MARGIN_S,
    ).bind(options.model_dump())


def serve_options(http_host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000) -> dict:
    """Keyword arguments for `serve.start`: HTTP and gRPC proxies with the grok1.v1 servicer."""
    return {"http_options": {"host": http_host, "port": http_port},
            "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}}



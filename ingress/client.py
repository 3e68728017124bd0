"""A typed Python client for the ingress, over HTTP (OpenAI routes, with `requests`) or gRPC (the grok1.v1 stubs).

    client = connect("http://127.0.0.1:8000")          # or connect("127.0.0.1:9000", grpc=True)
    result = client.generate("The answer is", max_tokens=16)
    for chunk in client.stream("The answer is", max_tokens=16):
        print(chunk.text, end="")

Both clients return the same dataclasses and raise `ClientError` (with the HTTP status or gRPC code, and
whether a retry may succeed) for every refusal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

RETRIABLE_HTTP = (429, 502, 503, 504)
RETRIABLE_GRPC = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")


class ClientError(RuntimeError):
    def __init__(self, message: str, status: int | str, retriable: bool):
        super().__init__(f"[{status}] {message}")
        self.message = message
        self.status = status  # HTTP status (int) or gRPC status code name (str)
        self.retriable = retriable


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    token_ids: list[int] = field(default_factory=list)  # gRPC only (OpenAI's HTTP responses carry text)
    logprobs: list[float] = field(default_factory=list)
    request_id: str = ""
    top_logprobs: list[dict[str, float]] = field(default_factory=list)  # per token, when top_logprobs was set


@dataclass
class Chunk:
    text: str
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    usage: Usage | None = None  # on the last chunk


@dataclass
class Health:
    ok: bool
    state: str
    detail: str


@dataclass
class GenerationParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    timeout_s: float | None = None
    top_logprobs: int | None = None  # with logprobs: the k most likely tokens at each position
    regex: str | None = None  # structured output: the text must match this regex ...
    json_schema: dict | None = None  # ... or this JSON schema


# ------------------------------------------------------------------------------------------------- HTTP


class HttpClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", model: str | None = None, timeout_s: float = 600,
                 api_key: str | None = None):
        import requests

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _body(self, prompt: str | list[int], sampling: GenerationParams, stream: bool) -> dict:
        body = {"prompt": prompt, "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": sampling.seed, "stream": stream}
        if self.model:
            body["model"] = self.model
        if sampling.stop:
            body["stop"] = sampling.stop
        if sampling.logprobs:
            body["logprobs"] = sampling.top_logprobs or 0
        if sampling.timeout_s:
            body["timeout_s"] = sampling.timeout_s
        if sampling.regex is not None or sampling.json_schema is not None:
            body["structured_outputs"] = {"regex": sampling.regex, "json": sampling.json_schema}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    @staticmethod
    def _raise(response) -> None:
        if response.status_code < 400:
            return
        try:
            message = response.json()["error"]["message"]
        except Exception:  # noqa: BLE001 - not our error shape (a proxy's page)
            message = response.text[:500]
        raise ClientError(message, response.status_code, response.status_code in RETRIABLE_HTTP)

    def generate(self, prompt: str | list[int], sampling: GenerationParams | None = None, **kwargs) -> Completion:
        sampling = sampling or GenerationParams(**kwargs)
        response = self.session.post(f"{self.base_url}/v1/completions", json=self._body(prompt, sampling, False),
                                     timeout=self.timeout_s)
        self._raise(response)
        data = response.json()
        choice = data["choices"][0]
        logprobs = choice.get("logprobs") or {}
        return Completion(choice["text"], choice["finish_reason"], Usage(data["usage"]["prompt_tokens"],
                                                                         data["usage"]["completion_tokens"]),
                          logprobs=logprobs.get("token_logprobs") or [], request_id=data["id"],
                          top_logprobs=logprobs.get("top_logprobs") or [] if sampling.top_logprobs else [])

    def tokenize(self, text: str) -> list[int]:
        return self._post("/tokenize", {"prompt": text})["tokens"]

    def detokenize(self, token_ids: list[int]) -> str:
        return self._post("/detokenize", {"tokens": list(token_ids)})["prompt"]

    def _post(self, path: str, body: dict) -> dict:
        response = self.session.post(f"{self.base_url}{path}", json=body, timeout=self.timeout_s)
        self._raise(response)
        return response.json()

    def stream(self, prompt: str | list[int], sampling: GenerationParams | None = None, **kwargs) -> Iterator[Chunk]:
        sampling = sampling or GenerationParams(**kwargs)
        with self.session.post(f"{self.base_url}/v1/completions", json=self._body(prompt, sampling, True),
                               stream=True, timeout=self.timeout_s) as response:
            self._raise(response)
            for line in response.iter_lines(decode_unicode=False):
                if not line.startswith(b"data: "):
                    continue
                payload = line[len(b"data: "):]
                if payload == b"[DONE]":
                    return
                data = json.loads(payload)
                if "error" in data:
                    error = data["error"]
                    retriable = error.get("code") in ("queue_full", "unavailable")
                    raise ClientError(error["message"], error.get("code", "error"), retriable)
                if data.get("usage") and not data["choices"]:
                    yield Chunk("", None, usage=Usage(data["usage"]["prompt_tokens"],
                                                      data["usage"]["completion_tokens"]))
                    continue
                for choice in data["choices"]:
                    logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
                    yield Chunk(choice["text"], choice["finish_reason"], logprobs=logprobs)

    def health(self) -> Health:
        response = self.session.get(f"{self.base_url}/health", timeout=self.timeout_s)
        data = response.json()
        return Health(bool(data.get("ok")), data.get("state", ""), data.get("detail", ""))

    def models(self) -> list[str]:
        response = self.session.get(f"{self.base_url}/v1/models", timeout=self.timeout_s)
        self._raise(response)
        return [m["id"] for m in response.json()["data"]]

    def metrics(self) -> str:
        response = self.session.get(f"{self.base_url}/metrics", timeout=self.timeout_s)
        self._raise(response)
        return response.text

    def close(self) -> None:
        self.session.close()


# ------------------------------------------------------------------------------------------------- gRPC


class GrpcClient:
    def __init__(self, target: str = "127.0.0.1:9000", application: str | None = None, timeout_s: float = 600,
                 api_key: str | None = None):
        import grpc

        from grok1_api.v1 import grok1_pb2_grpc

        self._grpc = grpc
        self.channel = grpc.insecure_channel(target)
        self.stub = grok1_pb2_grpc.Grok1ServiceStub(self.channel)
        self.metadata = ((("application", application),) if application else ()) + \
            ((("authorization", f"Bearer {api_key}"),) if api_key else ())
        self.timeout_s = timeout_s

    def _request(self, prompt: str | list[int], sampling: GenerationParams):
        from grok1_api.v1 import grok1_pb2 as pb

        request = pb.GenerateRequest(max_tokens=sampling.max_tokens, stop=sampling.stop, logprobs=sampling.logprobs,
                                     sampling=pb.SamplingParams(temperature=sampling.temperature,
                                                                top_p=sampling.top_p, top_k=sampling.top_k,
                                                                seed=sampling.seed))
        if sampling.timeout_s:
            request.timeout_s = sampling.timeout_s
        if sampling.top_logprobs is not None:
            request.top_logprobs = sampling.top_logprobs
        if sampling.regex is not None:
            request.structured_output.regex = sampling.regex
        elif sampling.json_schema is not None:
            request.structured_output.json_schema = json.dumps(sampling.json_schema)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.tokens.ids.extend(prompt)
        return request

    def _call(self, method, request):
        try:
            return method(request, metadata=self.metadata, timeout=self.timeout_s)
        except self._grpc.RpcError as err:
            raise self._error(err) from None

    def _error(self, err) -> ClientError:
        code = err.code().name if hasattr(err, "code") else "UNKNOWN"
        return ClientError(err.details() if hasattr(err, "details") else str(err), code, code in RETRIABLE_GRPC)

    def generate(self, prompt: str | list[int], sampling: GenerationParams | None = None, **kwargs) -> Completion:
        sampling = sampling or GenerationParams(**kwargs)
        r = self._call(self.stub.Generate, self._request(prompt, sampling))
        return Completion(r.text, r.finish_reason, Usage(r.usage.prompt_tokens, r.usage.completion_tokens),
                          list(r.token_ids), list(r.logprobs), r.request_id,
                          [{t.token: t.logprob for t in top.top} for top in r.top_logprobs])

    def stream(self, prompt: str | list[int], sampling: GenerationParams | None = None, **kwargs) -> Iterator[Chunk]:
        sampling = sampling or GenerationParams(**kwargs)
        call = self.stub.GenerateStream(self._request(prompt, sampling), metadata=self.metadata,
                                        timeout=self.timeout_s)
        try:
            for r in call:
                usage = Usage(r.usage.prompt_tokens, r.usage.completion_tokens) if r.HasField("usage") else None
                yield Chunk(r.text, r.finish_reason or None, list(r.token_ids), list(r.logprobs), usage)
        except self._grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            call.cancel()

    def tokenize(self, text: str) -> list[int]:
        from grok1_api.v1 import grok1_pb2 as pb

        return list(self._call(self.stub.Tokenize, pb.TokenizeRequest(text=text)).token_ids)

    def detokenize(self, token_ids: list[int]) -> str:
        from grok1_api.v1 import grok1_pb2 as pb

        return self._call(self.stub.Detokenize, pb.DetokenizeRequest(token_ids=token_ids)).text

    def health(self, probe: bool = True) -> Health:
        from grok1_api.v1 import grok1_pb2 as pb

        try:
            r = self.stub.Health(pb.HealthRequest(probe=probe), metadata=self.metadata, timeout=self.timeout_s)
        except self._grpc.RpcError as err:
            return Health(False, err.code().name, err.details() or "")
        return Health(r.ok, r.state, r.detail)

    def close(self) -> None:
        self.channel.close()


def connect(target: str, grpc: bool = False, **kwargs) -> HttpClient | GrpcClient:
    """An HttpClient for http(s)://... (or grpc=False), else a GrpcClient for host:port."""
    if grpc:
        return GrpcClient(target.removeprefix("grpc://"), **kwargs)
    return HttpClient(target if "://" in target else f"http://{target}", **kwargs)

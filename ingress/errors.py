"""One error type for the ingress, and the one table that maps failures to HTTP statuses and gRPC codes.

Every failure a client can see becomes an `ApiError` with a message that says what was wrong; HTTP renders it
in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`), gRPC as a status code with the
message as details. Errors from the router arrive wrapped by Ray (RayTaskError subclasses the original type
where it can, and keeps it in `.cause`), so `from_exception` looks through that wrapper.
"""

from __future__ import annotations

import grpc

from grok1.engine_api import InvalidRequest, QueueFull, Unavailable

# kind -> (HTTP status, OpenAI error type, gRPC status code)
KINDS = {
    "invalid_request": (400, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT),
    "unauthenticated": (401, "invalid_request_error", grpc.StatusCode.UNAUTHENTICATED),
    "body_timeout": (408, "invalid_request_error", grpc.StatusCode.DEADLINE_EXCEEDED),
    "model_not_found": (404, "invalid_request_error", grpc.StatusCode.NOT_FOUND),
    "not_found": (404, "invalid_request_error", grpc.StatusCode.NOT_FOUND),
    "too_large": (413, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT),
    "queue_full": (429, "rate_limit_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
    "unavailable": (503, "service_unavailable", grpc.StatusCode.UNAVAILABLE),
    "deadline": (504, "timeout", grpc.StatusCode.DEADLINE_EXCEEDED),
    "internal": (500, "server_error", grpc.StatusCode.INTERNAL),
}


class ApiError(Exception):
    def __init__(self, kind: str, message: str, param: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(kind, message, param)  # all of them in args: Ray pickles it across processes
        self.kind = kind
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message

    @property
    def http_status(self) -> int:
        return KINDS[self.kind][0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return KINDS[self.kind][2]

    @property
    def retriable(self) -> bool:
        return self.kind in ("queue_full", "unavailable")

    def body(self) -> dict:
        """OpenAI's error JSON."""
        return {"error": {"message": self.message, "type": KINDS[self.kind][1], "param": self.param,
                          "code": self.kind}}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError("invalid_request", message, param)


def from_exception(err: BaseException) -> ApiError:
    """The ApiError for an exception raised by the router (through Ray) or by the ingress itself."""
    if isinstance(err, ApiError):
        return err
    cause = getattr(err, "cause", None)
    for candidate in (err, cause):
        if isinstance(candidate, InvalidRequest):
            return ApiError("invalid_request", _first_line(candidate), getattr(candidate, "field", None))
        if isinstance(candidate, QueueFull):
            return ApiError("queue_full", _first_line(candidate))
        if isinstance(candidate, Unavailable):
            return ApiError("unavailable", _first_line(candidate))
    import ray.exceptions

    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return ApiError("unavailable", f"the model replica is not reachable ({type(err).__name__}); retry later")
    if isinstance(err, TimeoutError):
        return ApiError("deadline", "the request timed out")
    return ApiError("internal", f"{type(err).__name__}: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    """The original message: a RayTaskError's str() carries a traceback; its cause's args do not."""
    cause = getattr(err, "cause", None)
    source = cause if cause is not None else err
    text = str(source.args[0]) if source.args else str(source)
    return text.strip().splitlines()[-1] if "Traceback" in text else text

"""Errors a request can end with, each carrying its HTTP status and vLLM's error type name.

The engine raises these too (it knows nothing of HTTP, only that e.g. out-of-memory is "try again
later": 503). The API turns them into OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
A 400 is one of vLLM's two: InvalidBody, a body that does not validate against the request's model
(vLLM's RequestValidationError handler: type "Bad Request", param "body.<path>"), or InvalidRequest,
any other refusal of the request (vLLM's VLLMValidationError: type "BadRequestError", its message
ending in "(parameter=..., value=...)" where it names them).
"""
from __future__ import annotations


class ServiceError(Exception):
    status: int = 500
    type: str = "InternalServerError"
    kind: str = "internal"  # metrics label: one word per cause

    def __init__(self, message: str, *, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if kind:
            self.kind = kind

    def to_dict(self) -> dict:
        return {"error": {"message": self.wire_message, "type": self.type, "param": self.param, "code": self.status}}

    @property
    def wire_message(self) -> str:
        """The body's message."""
        return self.message

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the response carries beside the body."""
        return {}


class InvalidRequest(ServiceError):
    """vLLM's VLLMValidationError: `param` and `value` (the value refused) where vLLM names them."""

    status, type, kind = 400, "BadRequestError", "invalid_request"

    def __init__(self, message: str, *, value: object = None, **kwargs):
        super().__init__(message, **kwargs)
        self.value = value

    @property
    def wire_message(self) -> str:
        """As vLLM's str(VLLMValidationError) writes it: "<message> (parameter=<param>, value=<value>)"."""
        extras = [f"{name}={v}" for name, v in (("parameter", self.param), ("value", self.value)) if v is not None]
        return f"{self.message} ({', '.join(extras)})" if extras else self.message


class InvalidBody(InvalidRequest):
    """The body is not JSON, or does not validate against the request's model (vLLM's
    validation_exception_handler: its type, and `param` the path in the body, "body.<field>...")."""

    type, kind = "Bad Request", "malformed"

    @property
    def wire_message(self) -> str:
        return self.message


class Unauthorized(ServiceError):
    status, type, kind = 401, "AuthenticationError", "unauthorized"


class ModelNotFound(ServiceError):
    status, type, kind = 404, "NotFoundError", "model_not_found"


class RequestTimeout(ServiceError):
    """The client did not send its request in time (a slow client)."""

    status, type, kind = 408, "RequestTimeoutError", "request_timeout"


class PayloadTooLarge(ServiceError):
    status, type, kind = 413, "RequestEntityTooLargeError", "too_large"


class QueueFull(ServiceError):
    status, type, kind = 429, "RateLimitError", "queue_full"

    def __init__(self, message: str, *, retry_after_s: int | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        # The openai SDK (and LangChain, LiteLLM through it) waits as long as Retry-After says, up to
        # 60 s, before it retries; without it, its own 0.5-8 s backoff.
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else {}


class OutOfMemory(ServiceError):
    status, type, kind = 503, "ServiceUnavailableError", "out_of_memory"


class Unavailable(ServiceError):
    """Not ready yet, or shutting down."""

    status, type, kind = 503, "ServiceUnavailableError", "unavailable"


class Cancelled(ServiceError):
    """The client went away (nginx's 499); ends the request's event stream, is not counted as an error."""

    status, type, kind = 499, "ClientClosedRequest", "cancelled"


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded (start-up error, not a request error): the message says what to do."""

"""One small error hierarchy; `api/errors.py` maps it to HTTP once."""


class KronserveError(Exception):
    """Base of every error kronserve raises on purpose; `code` is the stable machine-readable name."""

    code = "internal"


class InvalidAdapter(KronserveError):
    """An adapter file or spec that cannot be served as it is (names the tensor or field)."""

    code = "invalid_adapter"


class UnsupportedFormat(InvalidAdapter):
    """Bytes that are not an adapter format kronserve reads (a pickle, a zip, text...)."""

    code = "unsupported_format"


class InvalidSpec(InvalidAdapter):
    code = "invalid_spec"


class BackboneMismatch(InvalidAdapter):
    """The adapter was made for another backbone (its fingerprint differs)."""

    code = "backbone_mismatch"


class UnknownTask(KronserveError):
    code = "unknown_task"


class InvalidRequest(KronserveError):
    """The request is well-formed but its contents are not acceptable (422); `param` names the field."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BadRequest(KronserveError):
    """The request cannot be read at all: malformed JSON, no file part (400)."""

    code = "bad_request"


class BankFull(KronserveError):
    """The catalogue quota (max_adapters registered tasks) is reached: 503, the operator's problem."""

    code = "bank_full"


class PinRefused(KronserveError):
    """409: pinning the task would leave pinned adapters needing more than the device budget."""

    code = "pin_refused"


class Overloaded(KronserveError):
    """The queue is full or the server is draining; the client should retry later."""

    code = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(Overloaded):
    code = "not_ready"


class RequestTimeout(Overloaded):
    code = "timeout"


class ReplicaUnavailable(Overloaded):
    """Cluster: no replica could take the request, or one died during an upload or delete (retry)."""

    code = "replica_unavailable"


class ClientClosed(KronserveError):
    """The client went away before its answer was ready (counted, never a server error)."""

    code = "client_closed"


class Unauthorized(KronserveError):
    code = "unauthorized"


class PayloadTooLarge(KronserveError):
    code = "payload_too_large"


class EngineRestarting(Overloaded):
    """The engine process died under this request (or is starting again): 503, retry after Retry-After."""

    code = "engine_restarting"

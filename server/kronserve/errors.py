"""One small error hierarchy; `api/errors.py` maps it to HTTP once."""


class KronserveError(Exception):
    """Base of every error kronserve raises on purpose; `code` is the stable machine-readable name."""

    code = "internal"


class InvalidAdapter(KronserveError):
    """An adapter file or spec that cannot be served as it is (names the tensor or field)."""

    code = "invalid_adapter"


class InvalidSpec(InvalidAdapter):
    code = "invalid_spec"


class BackboneMismatch(InvalidAdapter):
    """The adapter was made for another backbone (its fingerprint differs)."""

    code = "backbone_mismatch"


class UnknownTask(KronserveError):
    code = "unknown_task"


class InvalidRequest(KronserveError):
    code = "invalid_request"


class BankFull(KronserveError):
    code = "bank_full"

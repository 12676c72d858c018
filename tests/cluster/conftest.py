"""The cluster tests use the e2e server and adapter fixtures and the S3 tests' real moto server."""

from ..e2e.conftest import adapter_bytes  # noqa: F401 - fixtures, shared
from ..store.conftest import s3_endpoint  # noqa: F401

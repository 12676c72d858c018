"""The cluster tests use the e2e adapter fixture, and the session's shared servers (tests/conftest.py)."""

from ..e2e.conftest import adapter_bytes  # noqa: F401 - fixtures, shared

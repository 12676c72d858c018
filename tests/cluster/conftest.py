"""The cluster tests use the e2e server and adapter fixtures."""

from ..e2e.conftest import adapter_bytes  # noqa: F401 - a fixture, shared

"""Settings: the values a deployment passes are read as an operator means them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kronserve.config import Settings


@pytest.mark.parametrize("token", ["", "   "])
def test_an_empty_admin_token_means_no_token(token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRONSERVE_ADMIN_TOKEN", token)
    assert Settings().admin_token is None
    assert Settings(admin_token=token).admin_token is None
    assert Settings(admin_token="s3cret").admin_token.get_secret_value() == "s3cret"


@pytest.mark.parametrize(("field", "value"), [("device", "gpu"), ("dtype", "fp16"), ("log_level", "verbose")])
def test_choices_are_checked(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_log_level_is_case_insensitive() -> None:
    assert Settings(log_level="WARNING").log_level == "warning"


def test_torch_threads_default_to_every_core_to_serve_and_half_to_train(monkeypatch) -> None:
    import os

    from kronserve.config import Settings

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert (Settings().intra_op_threads(), Settings().intra_op_threads(training=True)) == (2, 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert Settings().intra_op_threads(training=True) == 1
    chosen = Settings(torch_threads=3)
    assert (chosen.intra_op_threads(), chosen.intra_op_threads(training=True)) == (3, 3)

"""Pushing a trained file to a server, saying where the file is when the push fails."""

from __future__ import annotations

from pathlib import Path

from ..errors import KronserveError


def upload(path: Path, task: str, url: str, token: str | None) -> int:
    """Push the file as TASK's next version; a failure says the trained file is safe, so nothing is retrained."""
    import kronserve_client

    try:
        with kronserve_client.KronserveClient(url, token) as client:
            return client.upload(task, [path]).version
    except kronserve_client.KronserveClientError as e:
        raise KronserveError(f"upload to {url} failed ({e}); the trained adapter is saved at {path}") from e

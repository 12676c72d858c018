"""Where a backbone comes from: a local directory or the Hugging Face hub, checked in a second at most.

Torch-free on purpose: the CLI checks a backbone before it pays for importing torch and transformers.
"""

from __future__ import annotations

from pathlib import Path

from .errors import KronserveError

HUB_PROBE_TIMEOUT_S = 2.0


def hub_unreachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be used now (offline mode, or no TCP connection within `timeout_s`), or
    None. A short probe instead of the hub client's own retries, which take half a minute to give up."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
    except OSError as e:
        return f"{url.hostname} did not answer: {e.strerror or e}"
    return None


def locate(source: str) -> bool:
    """Check, in a second at most, that `source` can be loaded; True when it must be read from local files only.

    A directory must hold a checkpoint; a name that cannot be a hub id is a directory that does not exist; a hub
    id is used from the cache when it is there, else only when the hub answers. Each failure is one KronserveError
    naming the cause, so a start-up that cannot succeed stops at once instead of waiting on the hub's retries.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KronserveError(f"backbone directory {source!r} has no config.json: not a saved T5 checkpoint")
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise KronserveError(f"backbone directory {source!r} does not exist") from None
    if path.exists():
        raise KronserveError(f"backbone {source!r} is a file; give a checkpoint directory or a hub id")
    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return True
    why = hub_unreachable()
    if why is not None:
        raise KronserveError(
            f"backbone {source!r} is not a directory, not in the hub cache, and the hub is unreachable ({why}); "
            "give a local checkpoint directory (`kronserve backbone tiny DIR` writes one offline)"
        )
    return False

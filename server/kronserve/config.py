"""All settings in one place; every field is also an environment variable `KRONSERVE_<NAME>`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TASK_ID_PATTERN = r"^[a-z0-9][a-z0-9._+-]{0,63}$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KRONSERVE_", extra="ignore")

    backbone: str | None = Field(
        default=None,
        description="hub id or directory; unset: t5-small if the hub answers, else an offline demo backbone",
    )
    store: str = Field(default="adapters_store", description="adapter store: a directory, or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint for an s3:// store (MinIO: http://host:9000); unset: AWS"
    )
    cache_dir: Path = Field(default=Path.home() / ".cache" / "kronserve", description="where the demo backbone goes")
    host: str = Field(default="127.0.0.1", description="listen address (0.0.0.0: every interface)")
    port: int = Field(default=8000, ge=0, le=65535, description="listen port")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when torch sees one")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="backbone weights")

    max_batch_rows: int = Field(default=64, ge=1, description="rows (inputs) per engine batch")
    max_batch_tokens: int = Field(default=16384, ge=1, description="input tokens per engine batch")
    batch_wait_ms: float = Field(default=5.0, ge=0, description="how long a batch waits to fill")
    batch_fill_fraction: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="under load, wait up to this share of the last batch's engine time to refill a batch (0: off)",
    )
    queue_size: int = Field(default=256, ge=1, description="queued requests before new ones get 503")
    request_timeout_s: float = Field(default=60.0, gt=0, description="per-request timeout (503 timeout)")
    max_inputs: int = Field(default=64, ge=1, description="inputs per request")
    max_input_tokens: int = Field(default=512, ge=1, description="input tokens kept per input (the rest truncated)")
    max_new_tokens: int = Field(default=512, ge=1, description="largest max_new_tokens a request may ask")
    max_beams: int = Field(default=8, ge=1, description="largest num_beams a request may ask")

    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="upload body limit (413 beyond)")
    accept_pickle: bool = Field(
        default=True, description="read AdapterHub .bin uploads (torch weights-only loader); false: 415"
    )
    max_adapters: int = Field(default=4096, ge=1, description="bank slots, i.e. resident adapter versions")
    admin_token: SecretStr | None = Field(
        default=None, description="when set, PUT/DELETE need it as Bearer; empty or unset: no token (a warning)"
    )
    metrics_max_tasks: int = Field(default=100, ge=0, description="tasks with their own metric label")
    redis_url: str | None = Field(
        default=None, description="Redis for change notices between processes sharing a store (redis://host:6379)"
    )
    store_poll_s: float = Field(
        default=0.0, ge=0, description="poll the store's epoch this often for versions made elsewhere (0: off)"
    )
    replicas: int = Field(default=2, ge=1, description="kronserve cluster: backbone replicas")
    replica_gpus: float = Field(default=0, ge=0, description="kronserve cluster: GPUs each replica asks Ray for")
    spill_idle_s: float = Field(
        default=300, gt=0, description="kronserve cluster: drop a replica's copy of another's task idle this long"
    )
    ray_address: str | None = Field(default=None, description="kronserve cluster: join this Ray cluster")
    probe_interval_s: float = Field(default=0.5, gt=0, description="kronserve cluster: gateway's replica probe period")
    probe_timeout_s: float = Field(default=2.0, gt=0, description="kronserve cluster: a probe slower than this is down")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(default="info", description="log level")
    fault_point: str | None = Field(
        default=None, description="tests only: SIGKILL the server at this moment of an upload (see store.FAULT_POINTS)"
    )

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        """`KRONSERVE_ADMIN_TOKEN=` (compose's `${VAR:-}`) means no token: a blank one would lock out every client,
        since no client sends `Authorization: Bearer ` with nothing after it."""
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, SecretStr) and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

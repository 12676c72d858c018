"""All settings in one place; every field is also an environment variable `KRONSERVE_<NAME>`."""

from __future__ import annotations

import os
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
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "kronserve",
        description="where the demo backbone, demo tasks and the start-up index go",
    )
    host: str = Field(default="127.0.0.1", description="listen address (0.0.0.0: every interface)")
    port: int = Field(default=8000, ge=0, le=65535, description="listen port")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when torch sees one")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="backbone weights")

    max_batch_rows: int = Field(
        default=64, ge=1, description="running decoder rows (beams count one each); rows of one score pass"
    )
    max_batch_tokens: int = Field(
        default=16384, ge=1, description="tokens of one score pass; padded input tokens of an idle batch's admission"
    )
    max_step_tokens: int | None = Field(
        default=None,
        ge=1,
        description="padded input tokens encoded between two decode steps (a longer input alone); unset: t5-small's "
        "256 in encoder work (more for smaller backbones, 16x on CUDA)",
    )
    max_cached_tokens: int = Field(
        default=262144,
        ge=1,
        description="token positions the running rows' caches may reserve (rows × (input + max_new_tokens))",
    )
    batch_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="an idle engine lets a burst gather while requests keep arriving (checked every fifth of this; "
        "10 times this at most)",
    )
    batching: Literal["continuous", "static"] = Field(
        default="continuous",
        description="continuous: rows join and leave at every step; static: one generate() per batch (baseline)",
    )
    engine_process: bool = Field(
        default=True,
        description="run the engine (model, tiers, step loop) in its own process; false: one process (as a replica)",
    )
    api_workers: int = Field(default=1, ge=1, description="API processes (HTTP, tokens, text) in front of one engine")
    engine_crash_deaths: int = Field(
        default=5, ge=1, description="engine deaths within engine_crash_window_s that stop the server (a crash loop)"
    )
    engine_crash_window_s: float = Field(default=300.0, gt=0, description="see engine_crash_deaths")
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1, description="JSON body limit of predict and score requests (413 beyond)"
    )
    queue_size: int = Field(default=256, ge=1, description="queued requests before new ones get 503")
    request_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="per-request timeout (503 timeout); a stream's bounds the wait for its first token and each gap",
    )
    max_inputs: int = Field(default=64, ge=1, description="inputs per request")
    max_input_tokens: int = Field(
        default=512, ge=1, description="an input or target over this many tokens is refused (422), never truncated"
    )
    max_new_tokens: int = Field(default=512, ge=1, description="largest max_new_tokens a request may ask")
    max_beams: int = Field(default=8, ge=1, description="largest num_beams a request may ask")

    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="upload body limit (413 beyond)")
    keepalive_timeout_s: int = Field(default=5, ge=1, description="close a kept-alive connection idle this long")
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="close a connection whose request head is not complete this long"
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="answer 408 when a request body sends no bytes for this long"
    )
    stream_write_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="drop a client that takes no bytes of its answer this long once the buffers are full (a stream "
        "nobody reads): its request leaves the engine",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads of the engine, demo training and kronserve train; unset: every core while "
        "serving, half of them while training (measured: see the README)",
    )
    max_connections: int = Field(
        default=1024, ge=1, description="open connections (or requests) before new ones get a plain 503 (uvicorn)"
    )
    accept_pickle: bool = Field(
        default=True, description="read AdapterHub .bin uploads (torch weights-only loader); false: 415"
    )
    max_adapters: int = Field(
        default=1_000_000, ge=1, description="registered tasks (a catalogue quota; 503 bank_full for a new one beyond)"
    )
    host_adapter_mb: float = Field(
        default=4096, gt=0, description="host tier: packed adapters kept in RAM (LRU; a miss reads the store)"
    )
    device_adapter_mb: float = Field(
        default=1024, gt=0, description="device tier: adapters batches read (LRU; a miss copies from the host tier)"
    )
    pinned_tasks: str = Field(
        default="", description="comma-separated tasks kept on the device, never evicted (see also PUT .../pin)"
    )
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

    def intra_op_threads(self, training: bool = False) -> int:
        """`torch_threads`; unset, every core to serve and half of them (at least 1) to train: on a 2-core machine
        serving gained 45% from the second thread when quiet and lost 11% when busy, while training gained nothing
        when quiet and lost 2.4x when busy (OpenMP threads spin-waiting on contended cores)."""
        cores = os.cpu_count() or 1
        return self.torch_threads or (max(1, cores // 2) if training else cores)

    @property
    def pinned(self) -> list[str]:
        return [t.strip() for t in self.pinned_tasks.split(",") if t.strip()]

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

"""The `kronserve` command: backbones, adapters, and (see `serve`) the service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .backbone import SHAPES
from .errors import KronserveError
from .train import train_command

app = typer.Typer(
    help="kronserve: multi-task Compacter-family adapter serving on one frozen T5.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
backbone_app = typer.Typer(help="Backbones.", no_args_is_help=True)
adapter_app = typer.Typer(help="Adapter files.", no_args_is_help=True)
app.add_typer(backbone_app, name="backbone")
app.add_typer(adapter_app, name="adapter")
app.command("train")(train_command)


@backbone_app.command("tiny")
def backbone_tiny(
    out_dir: Path,
    shape: Annotated[str, typer.Option(help=f"one of {', '.join(SHAPES)}")] = "tiny",
    seed: int = 0,
) -> None:
    """Write a randomly initialized T5 of a real shape with a byte tokenizer (no download needed)."""
    from .backbone import write_tiny_backbone

    write_tiny_backbone(out_dir, shape, seed)  # type: ignore[arg-type]
    typer.echo(str(out_dir))


@app.command()
def serve(
    backbone: Annotated[str | None, typer.Option(help="hub id or directory [env KRONSERVE_BACKBONE]")] = None,
    store: Annotated[
        str | None, typer.Option(help="adapter store: a directory, or s3://bucket/prefix [env KRONSERVE_STORE]")
    ] = None,
    s3_endpoint_url: Annotated[
        str | None, typer.Option(help="S3-compatible endpoint, e.g. MinIO [env KRONSERVE_S3_ENDPOINT_URL]")
    ] = None,
    host: Annotated[str | None, typer.Option(help="[env KRONSERVE_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="[env KRONSERVE_PORT]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda [env KRONSERVE_DEVICE]")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, float16 [env KRONSERVE_DTYPE]")] = None,
    max_batch_rows: Annotated[int | None, typer.Option(help="[env KRONSERVE_MAX_BATCH_ROWS]")] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help="[env KRONSERVE_MAX_BATCH_TOKENS]")] = None,
    batch_wait_ms: Annotated[float | None, typer.Option(help="[env KRONSERVE_BATCH_WAIT_MS]")] = None,
    queue_size: Annotated[int | None, typer.Option(help="[env KRONSERVE_QUEUE_SIZE]")] = None,
    request_timeout_s: Annotated[float | None, typer.Option(help="[env KRONSERVE_REQUEST_TIMEOUT_S]")] = None,
    max_upload_bytes: Annotated[int | None, typer.Option(help="[env KRONSERVE_MAX_UPLOAD_BYTES]")] = None,
    keepalive_timeout_s: Annotated[int | None, typer.Option(help="[env KRONSERVE_KEEPALIVE_TIMEOUT_S]")] = None,
    header_timeout_s: Annotated[float | None, typer.Option(help="[env KRONSERVE_HEADER_TIMEOUT_S]")] = None,
    body_timeout_s: Annotated[float | None, typer.Option(help="[env KRONSERVE_BODY_TIMEOUT_S]")] = None,
    max_connections: Annotated[int | None, typer.Option(help="[env KRONSERVE_MAX_CONNECTIONS]")] = None,
    admin_token: Annotated[str | None, typer.Option(help="[env KRONSERVE_ADMIN_TOKEN]")] = None,
) -> None:
    """Start the HTTP service. Every option can also come from its KRONSERVE_* environment variable."""
    from .api.app import serve as run
    from .config import Settings

    given = {k: v for k, v in locals().items() if v is not None and k != "run" and k != "Settings"}
    run(Settings(**given))


@app.command()
def cluster(
    replicas: Annotated[int | None, typer.Option(help="backbone replicas [env KRONSERVE_REPLICAS]")] = None,
    backbone: Annotated[str | None, typer.Option(help="hub id or directory [env KRONSERVE_BACKBONE]")] = None,
    store: Annotated[str | None, typer.Option(help="directory or s3://bucket/prefix [env KRONSERVE_STORE]")] = None,
    host: Annotated[str | None, typer.Option(help="[env KRONSERVE_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="[env KRONSERVE_PORT]")] = None,
    s3_endpoint_url: Annotated[str | None, typer.Option(help="[env KRONSERVE_S3_ENDPOINT_URL]")] = None,
    redis: Annotated[str | None, typer.Option(help="redis:// URL for change notices [env KRONSERVE_REDIS_URL]")] = None,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster [env KRONSERVE_RAY_ADDRESS]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda [env KRONSERVE_DEVICE]")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, float16 [env KRONSERVE_DTYPE]")] = None,
) -> None:
    """Serve the same /v1 API from N backbone replicas on Ray Serve (starts a local Ray head unless --address)."""
    from .cluster.app import run
    from .config import Settings

    given = {k: v for k, v in locals().items() if v is not None and k not in ("run", "Settings")}
    renamed = {"redis": "redis_url", "address": "ray_address"}
    run(Settings(**{renamed.get(k, k): v for k, v in given.items()}))


@adapter_app.command("init")
def adapter_init(
    out: Path,
    method: Annotated[str, typer.Option(help="compacter, compacter++, phm, houlsby, pfeiffer or lora")] = "compacter++",
    backbone: Annotated[str, typer.Option(help="hub id or directory of the backbone")] = ...,  # type: ignore[assignment]
    task: Annotated[str, typer.Option(help="task id the adapter serves")] = ...,  # type: ignore[assignment]
    reduction_factor: int | None = None,
    phm_dim: int | None = None,
    rank: int | None = None,
    placement: str | None = None,
    activation: str | None = None,
    scaling: float | None = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha")] = None,
    targets: Annotated[str | None, typer.Option(help="LoRA projections, comma-separated: q,k,v,o,wi,wo")] = None,
    layer_norms: Annotated[bool, typer.Option(help="carry per-task T5 layer norms")] = False,
    seed: int = 0,
    std: Annotated[
        float | None, typer.Option(help="draw every weight from N(0, std) instead of the paper init")
    ] = None,
) -> None:
    """Write a new adapter for BACKBONE, initialized as its paper does (or randomly with --std)."""
    from .backbone import load_backbone
    from .formats.native import AdapterFile, save
    from .methods import init_tensors, preset
    from .t5_sites import base_norms

    spec = preset(
        method,
        reduction_factor=reduction_factor,
        phm_dim=phm_dim,
        rank=rank,
        placement=placement,
        activation=activation,
        scaling=scaling,
        alpha=alpha,
        targets=tuple(targets.split(",")) if targets else None,
        layer_norms=layer_norms or None,
    )
    bb = load_backbone(backbone, device="cpu")
    fp = bb.fingerprint
    geometry = fp.geometry
    norms = {k: v.float() for k, v in base_norms(bb.model).items()}
    tensors = init_tensors(spec, geometry, seed=seed, std=std, base_norms=norms)
    save(AdapterFile(task, spec, fp, tensors), out)
    typer.echo(json.dumps(_describe(spec, geometry, task)))


store_app = typer.Typer(help="The adapter store.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("check")
def store_check(
    store: Annotated[Path, typer.Argument(help="store directory")],
    repair: Annotated[bool, typer.Option(help="remove orphaned files (interrupted uploads)")] = False,
) -> None:
    """Verify every task's pointer and file hash and list orphans; exit 1 if anything is wrong."""
    from dataclasses import asdict

    from .store import LocalStore

    if not store.is_dir():
        raise KronserveError(f"{store} is not a directory")
    report = LocalStore(store).check(repair=repair)
    typer.echo(json.dumps(asdict(report), indent=2))
    if not report.clean:
        raise typer.Exit(1)


@app.command("import")
def import_adapter(
    src: Annotated[Path, typer.Argument(help="a saved AdapterHub directory, or a native file")],
    out: Annotated[Path, typer.Argument(help="native .safetensors file to write")],
    backbone: Annotated[str, typer.Option(help="hub id or directory of the serving backbone")] = ...,  # type: ignore[assignment]
    task: Annotated[str | None, typer.Option(help="task id stored in the file (default: SRC's name)")] = None,
) -> None:
    """Convert a foreign adapter into a native file for BACKBONE (validated exactly as an upload is)."""
    from .backbone import load_backbone
    from .formats.importers import read_source, to_adapter
    from .formats.native import save

    fingerprint = load_backbone(backbone, device="cpu").fingerprint
    adapter = to_adapter(read_source(src), task or src.stem.lower(), fingerprint)
    save(adapter, out)
    typer.echo(json.dumps(_describe(adapter.spec, adapter.geometry, adapter.task)))


@adapter_app.command("inspect")
def adapter_inspect(file: Path) -> None:
    """Print an adapter file's task, spec, backbone and parameter count as JSON."""
    from .formats.native import load

    a = load(file)
    typer.echo(json.dumps({**_describe(a.spec, a.geometry, a.task), "backbone": a.fingerprint.as_dict()}, indent=2))


def _describe(spec, geometry, task: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {
        "task": task,
        "method": spec.method,
        "params": spec.param_count(geometry),
        "spec": spec.model_dump(),
    }


def main() -> None:
    """Console entry: a KronserveError is the user's to fix, so print its message, not a traceback."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        app()
    except KronserveError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None

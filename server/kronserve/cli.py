"""The `kronserve` command: backbones, adapters, training, and (see `serve`) the service.

Nothing here imports torch at module level, so `kronserve --help` and `--version` answer at once; each command
imports what it needs. Every failure is one `error: ...` line on stderr (`kronserve --debug ...` shows the
traceback).
"""

from __future__ import annotations

import enum
import errno
import inspect
import json
import os
import socket
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr, ValidationError

from . import __version__
from .config import Settings
from .errors import KronserveError
from .hub import locate

app = typer.Typer(
    help="kronserve: multi-task Compacter-family adapter serving on one frozen T5.",
    no_args_is_help=True,
    rich_markup_mode=None,  # click's plain help: rich's table cut option and variable names at 80 columns
    pretty_exceptions_enable=False,
)
backbone_app = typer.Typer(help="Backbones.", no_args_is_help=True, rich_markup_mode=None)
adapter_app = typer.Typer(help="Adapter files.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(backbone_app, name="backbone")
app.add_typer(adapter_app, name="adapter")


def choices(name: str, values: typing.Iterable[str]) -> type[enum.StrEnum]:
    """A str enum typer shows and checks as a choice (typer has no Literal support); members compare as str."""
    return enum.StrEnum(name, {v: v for v in values})  # type: ignore[return-value]


Shape = choices("Shape", ("tiny", "t5-small", "t5-base"))  # backbone.SHAPES' keys: --help must not import torch
Device = choices("Device", ("auto", "cpu", "cuda"))
METHODS = "compacter, compacter++, phm, houlsby, pfeiffer, lora, prefix or mam"
PREFIX_LENGTH = "prefix and mam: key/value prefix length per attention"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kronserve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="on an error, show its traceback")] = False,
) -> None:
    """kronserve: multi-task Compacter-family adapter serving on one frozen T5."""
    # `--debug` is declared here for --help and parsing; main() reads it from argv, since it must also cover errors
    # raised while the arguments are parsed.


# ---- options generated from Settings -------------------------------------------------------------

# Settings that only `kronserve cluster` reads, and one only the crash tests set (by environment).
CLUSTER_ONLY = frozenset(
    {"replicas", "replica_gpus", "spill_idle_s", "ray_address", "probe_interval_s", "probe_timeout_s"}
)
NOT_OPTIONS = frozenset({"fault_point"})
FLAGS = {"redis_url": ("--redis", "--redis-url"), "ray_address": ("--address", "--ray-address")}


def settings_signature(exclude: frozenset[str]) -> inspect.Signature:
    """One `--name` option per Settings field, so a command never drifts from the settings it passes on.

    Each option defaults to None (not given: Settings reads `KRONSERVE_<NAME>` or its own default), and its help
    shows the field's description, its environment variable and its default.
    """
    params = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_option(name, field))
        for name, field in Settings.model_fields.items()
        if name not in exclude
    ]
    return inspect.Signature(params)


def _option(name: str, field: Any) -> Any:
    kind: Any = field.annotation
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is typing.Literal:
        kind = choices(name, typing.get_args(kind))
    elif kind is SecretStr:
        kind = str
    dashed = name.replace("_", "-")
    flags = FLAGS.get(name) or ((f"--{dashed}/--no-{dashed}",) if kind is bool else (f"--{dashed}",))
    default = field.get_default(call_default_factory=True)
    env = f"[env KRONSERVE_{name.upper()}]"
    help_text = f"{field.description} {env}" if field.description else env
    option = typer.Option(
        *flags,
        help=help_text,
        show_default="unset" if default is None else str(default),
    )
    return Annotated[kind | None, option]


def _settings(given: dict[str, Any]) -> Settings:
    """Options given on the command line over `KRONSERVE_*` variables over defaults."""
    return Settings(**{k: str(v) if isinstance(v, enum.Enum) else v for k, v in given.items() if v is not None})


def _check_places(settings: Settings) -> None:
    """What would otherwise fail after seconds of start-up, with an exception's name: a port another process
    listens on, and a local store path that is a file."""
    store = Path(settings.store)
    if "://" not in settings.store and store.exists() and not store.is_dir():
        raise KronserveError(f"the store {settings.store} is a file; --store names a directory (made if missing)")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing one is no conflict
        try:
            probe.bind((settings.host, settings.port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise KronserveError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror}") from None
            raise KronserveError(
                f"{settings.host}:{settings.port} is already in use (another server?); choose another with --port"
            ) from None


def serve(**given: Any) -> None:
    """Start the HTTP service. Every option can also come from its KRONSERVE_* environment variable."""
    # What can be known before listening is checked first (backbone, CUDA): a server that can never be ready must
    # not start. A start-up that fails later stops the server with a non-zero exit (api.app.serve).
    settings = _settings(given)
    _check_places(settings)
    if settings.backbone is not None:
        locate(settings.backbone)
    if settings.device == "cuda":
        from .backbone import resolve_device

        resolve_device(settings.device)
    from .api.app import serve as run

    run(settings)


serve.__signature__ = settings_signature(CLUSTER_ONLY | NOT_OPTIONS)  # type: ignore[attr-defined]
app.command()(serve)


def cluster(**given: Any) -> None:
    """Serve the same /v1 API from N backbone replicas on Ray Serve (starts a local Ray head unless --address)."""
    settings = _settings(given)
    _check_places(settings)
    if settings.backbone is not None:
        locate(settings.backbone)
    from .cluster.app import run

    run(settings)


cluster.__signature__ = settings_signature(NOT_OPTIONS)  # type: ignore[attr-defined]
app.command()(cluster)


@backbone_app.command("tiny")
def backbone_tiny(
    out_dir: Path,
    shape: Shape = Shape.tiny,  # type: ignore[attr-defined]
    seed: int = 0,
) -> None:
    """Write a randomly initialized T5 of a real shape with a byte tokenizer (no download needed)."""
    from .backbone import write_tiny_backbone

    write_tiny_backbone(out_dir, str(shape), seed)  # type: ignore[arg-type]
    typer.echo(str(out_dir))


@adapter_app.command("init")
def adapter_init(
    out: Path,
    method: Annotated[str, typer.Option(help=METHODS)] = "compacter++",
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
    prefix_length: Annotated[int | None, typer.Option(help=PREFIX_LENGTH)] = None,
    seed: int = 0,
    std: Annotated[
        float | None, typer.Option(help="draw every weight from N(0, std) instead of the paper init")
    ] = None,
) -> None:
    """Write a new adapter for BACKBONE, initialized as its paper does (or randomly with --std)."""
    locate(backbone)  # fails in a second, before torch is imported, on a backbone that cannot load
    from .backbone import load_backbone
    from .formats.native import MAX_BASE_MODEL, AdapterFile, save
    from .methods import init_tensors, preset
    from .t5_sites import base_norms

    bb = load_backbone(backbone, device="cpu")
    fp = bb.fingerprint
    geometry = fp.geometry
    spec = preset(
        method,
        geometry,
        reduction_factor=reduction_factor,
        phm_dim=phm_dim,
        rank=rank,
        placement=placement,
        activation=activation,
        scaling=scaling,
        alpha=alpha,
        targets=tuple(targets.split(",")) if targets else None,
        layer_norms=layer_norms or None,
        prefix_length=prefix_length,
    )
    norms = {k: v.float() for k, v in base_norms(bb.model).items()}
    tensors = init_tensors(spec, geometry, seed=seed, std=std, base_norms=norms)
    save(AdapterFile(task, spec, fp, tensors, backbone[:MAX_BASE_MODEL]), out)  # base_model: as typed
    typer.echo(json.dumps({**_describe(spec, geometry, task), "base_model": backbone[:MAX_BASE_MODEL]}))


@app.command("train")
def train_command(
    backbone: Annotated[str, typer.Option(help="hub id or directory of the frozen T5")],
    data: Annotated[
        Path, typer.Option(help='.jsonl of {"input", "target"} objects, or .csv with columns input,target')
    ],
    task: Annotated[str, typer.Option(help="task id the adapter serves")],
    out: Annotated[Path, typer.Option(help="where to write the native .safetensors adapter")],
    method: Annotated[str, typer.Option(help=METHODS)] = "compacter++",
    reduction_factor: Annotated[int | None, typer.Option(help="d_model / bottleneck size")] = None,
    phm_dim: Annotated[int | None, typer.Option(help="PHM methods: number of Kronecker summands")] = None,
    rank: Annotated[int | None, typer.Option(help="rank of Compacter's W_i factors, or LoRA's rank")] = None,
    layer_norms: Annotated[bool, typer.Option(help="train per-task T5 layer norms too")] = False,
    prefix_length: Annotated[int | None, typer.Option(help=PREFIX_LENGTH)] = None,
    epochs: int = 10,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many optimizer steps (all epochs)")] = None,
    batch_size: int = 16,
    lr: float = 3e-3,
    eval_fraction: Annotated[float, typer.Option(help="share of the data held out for early stopping")] = 0.1,
    patience: Annotated[int, typer.Option(help="epochs without a better eval accuracy before stopping")] = 3,
    max_new_tokens: Annotated[int | None, typer.Option(help="eval generation length (unset: longest target)")] = None,
    seed: int = 0,
    device: Device = Device.auto,  # type: ignore[attr-defined]
    upload_url: Annotated[str | None, typer.Option("--upload", help="server URL to upload the result to")] = None,
    token: Annotated[str | None, typer.Option(envvar="KRONSERVE_TOKEN", help="admin token for --upload")] = None,
    force: Annotated[
        bool, typer.Option(help="--upload even if the held-out accuracy never rose above the untrained adapter's")
    ] = False,
) -> None:
    """Train an adapter for TASK on DATA with the backbone frozen; print a JSON summary (and upload it).

    A run whose held-out accuracy never rises above the untrained adapter's warns, and is not uploaded (exit 1)
    unless --force.
    """
    locate(backbone)
    import torch

    from .train import TrainConfig, train, upload

    torch.set_num_threads(Settings().intra_op_threads(training=True))  # KRONSERVE_TORCH_THREADS, as the server

    config = TrainConfig(
        method, reduction_factor, phm_dim, rank, layer_norms, epochs, batch_size, lr, eval_fraction, patience,
        max_new_tokens, seed, str(device), max_steps=max_steps, prefix_length=prefix_length,
    )  # fmt: skip
    result = train(backbone, data, task, out, config)
    typer.echo(json.dumps(result.summary()))
    if result.improved is False:
        warning = (
            f"warning: the held-out accuracy never rose above the untrained adapter's ({result.start.accuracy:.3f}); "  # type: ignore[union-attr]
            f"{result.path} may have learned nothing (more data, epochs or a higher --lr?)"
        )
        if upload_url and not force:
            typer.echo(f"{warning}; not uploaded (--force uploads it anyway)", err=True)
            raise typer.Exit(1)
        typer.echo(warning, err=True)
    if upload_url:
        version = upload(result.path, task, upload_url, token)
        typer.echo(json.dumps({"uploaded": task, "url": upload_url, "version": version}))


store_app = typer.Typer(help="The adapter store.", no_args_is_help=True, rich_markup_mode=None)
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
    src: Annotated[Path, typer.Argument(help="a saved AdapterHub directory, or a native file", exists=True)],
    out: Annotated[Path, typer.Argument(help="native .safetensors file to write")],
    backbone: Annotated[str, typer.Option(help="hub id or directory of the serving backbone")] = ...,  # type: ignore[assignment]
    task: Annotated[str | None, typer.Option(help="task id stored in the file (default: SRC's name)")] = None,
) -> None:
    """Convert a foreign adapter into a native file for BACKBONE (validated exactly as an upload is)."""
    locate(backbone)
    from .backbone import load_backbone
    from .formats.importers import read_source, to_adapter
    from .formats.native import save

    served = load_backbone(backbone, device="cpu")
    adapter = to_adapter(read_source(src), task or src.stem.lower(), served.fingerprint, True, served.weights)
    save(adapter, out)
    typer.echo(
        json.dumps({**_describe(adapter.spec, adapter.geometry, adapter.task), "base_model": adapter.base_model})
    )


@adapter_app.command("inspect")
def adapter_inspect(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)]) -> None:
    """Print an adapter file's task, spec, backbone and parameter count as JSON."""
    from .formats.native import load

    a = load(file)
    described = {
        **_describe(a.spec, a.geometry, a.task),
        "backbone": a.fingerprint.as_dict(),
        "base_model": a.base_model,
    }
    typer.echo(json.dumps(described, indent=2))


def _describe(spec, geometry, task: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {
        "task": task,
        "method": spec.method,
        "params": spec.param_count(geometry),
        "spec": spec.model_dump(),
    }


def main() -> None:
    """Console entry: every failure is one `error: ...` line on stderr (a usage error exits 2, a KronserveError or
    a bad setting 2, anything else 1); `--debug` re-raises instead, traceback and all."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers reads it: no download bars in logs
    debug = "--debug" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        _fail("aborted", 1)
    except Exception as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `kronserve` alone: the help is the answer
            typer.echo(e.format_message() or None, nl=False)  # type: ignore[attr-defined]
            raise SystemExit(0) from None
        if _is_usage_error(e):
            _fail(f"{e.format_message()} (see --help)", e.exit_code)  # type: ignore[attr-defined]
        if debug:
            raise
        _fail(_one_line(e), 2 if isinstance(e, KronserveError | ValidationError) else 1)
    raise SystemExit(code if isinstance(code, int) else 0)


def _is_usage_error(e: Exception) -> bool:
    """A bad option or argument (click's UsageError/BadParameter, vendored by recent typer: matched by shape)."""
    return callable(getattr(e, "format_message", None)) and isinstance(getattr(e, "exit_code", None), int)


def _one_line(e: Exception) -> str:
    if isinstance(e, ValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return f"invalid setting: {problems}"
    text = " ".join(str(e).split())
    return text if isinstance(e, KronserveError) else f"{type(e).__name__}: {text}"


def _fail(message: str, code: int) -> typing.NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(code)

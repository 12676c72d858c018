"""`kronserve-client`: the REST API from a shell, JSON on stdout so replies pipe into jq and scripts.

Errors go to stderr as one `error: <status> <code>: <message>` line with exit status 1, so scripts can tell a failed
call from its output without parsing it.
"""

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import typer

from .client import DEFAULT_URL, KronserveClient, Sampling
from .errors import KronserveClientError, Unreachable
from .models import PredictResult, StreamDelta

__all__ = ["DEFAULT_URL", "app", "make_client", "run"]

app = typer.Typer(
    name="kronserve-client",
    help="Call a kronserve server: predict, score, and manage adapters.",
    no_args_is_help=True,
    add_completion=False,
)


def run() -> None:
    """Console entry: a usage error (unknown command, bad option) is one `error: ...` line too, exit status 2."""
    try:
        code = app(standalone_mode=False)
    except Exception as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `kronserve-client` alone: the help is the answer
            typer.echo(e.format_message() or None, nl=False)  # type: ignore[attr-defined]
            raise SystemExit(0) from None
        if not (callable(getattr(e, "format_message", None)) and isinstance(getattr(e, "exit_code", None), int)):
            raise  # click's usage errors (vendored by recent typer) are matched by shape
        typer.echo(f"error: {e.format_message()} (see --help)", err=True)  # type: ignore[attr-defined]
        raise SystemExit(e.exit_code) from None  # type: ignore[attr-defined]
    raise SystemExit(code if isinstance(code, int) else 0)


def make_client(url: str, token: str | None, retries: int = 0) -> KronserveClient:
    """The one place the CLI builds its client; tests replace it to put a mock transport underneath."""
    return KronserveClient(url, token=token or "", retries=retries)


@dataclass(frozen=True, slots=True)
class _Settings:
    url: str
    token: str | None
    retries: int


def _print_version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"kronserve-client {version('kronserve')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("kronserve-client (not installed)")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str, typer.Option("--url", envvar="KRONSERVE_URL", help="Base URL of the server.")] = DEFAULT_URL,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", envvar="KRONSERVE_TOKEN", help="Admin bearer token (upload, delete).", show_default=False
        ),
    ] = None,
    retries: Annotated[
        int, typer.Option("--retries", min=0, help="Retry a shed (429/503) or unsent request, after Retry-After.")
    ] = 0,
    show_version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = _Settings(url=url, token=token or None, retries=retries)


def _call(ctx: typer.Context, action: Callable[[KronserveClient], Any], echo: bool = True) -> Any:
    """Run one client call, print its JSON (unless `echo` is off: it printed as it went) and return it; every failure
    becomes one stderr line and exit status 1."""
    settings: _Settings = ctx.obj
    try:
        with make_client(settings.url, settings.token, settings.retries) as client:
            result = action(client)
    except Unreachable as exc:  # no reply at all: refused, timed out, bad URL
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    except KronserveClientError as exc:
        typer.echo(f"error: {exc.status} {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    if echo:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
    return result


@app.command()
def predict(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task whose adapter generates.")],
    inputs: Annotated[list[str], typer.Argument(help="Input texts, one output each.")],
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1, help="default: the server's")] = None,
    min_new_tokens: Annotated[int, typer.Option("--min-new-tokens", min=0, help="no end of sequence before")] = 0,
    num_beams: Annotated[int, typer.Option("--num-beams", min=1)] = 1,
    temperature: Annotated[float, typer.Option("--temperature", min=0, help="0: greedy; above: sampling")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0, max=1)] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="0: off")] = 0,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="the same seed, the same sample")] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="end the output before this; repeat (up to 4)")
    ] = None,
    stream: Annotated[
        bool, typer.Option("--stream", help="print text as it is decoded (one input: raw text; several: JSON lines)")
    ] = False,
) -> None:
    """Generate outputs for INPUTS with TASK's adapter."""
    sampling = Sampling(temperature, top_p, top_k, seed, tuple(stop or ()))
    if stream:
        _call(
            ctx,
            lambda client: _stream(
                client.predict_stream(task, inputs, max_new_tokens, num_beams, min_new_tokens, sampling), len(inputs)
            ),
            echo=False,
        )
        return

    def action(client: KronserveClient) -> dict[str, Any]:
        return asdict(client.predict(task, inputs, max_new_tokens, num_beams, min_new_tokens, sampling))

    _call(ctx, action)


def _stream(events: Iterator[StreamDelta | PredictResult], inputs: int) -> None:
    for item in events:
        if isinstance(item, StreamDelta) and inputs == 1:
            typer.echo(item.text, nl=False)
        elif isinstance(item, StreamDelta):
            typer.echo(json.dumps(asdict(item), ensure_ascii=False))
    if inputs == 1:
        typer.echo("")


@app.command()
def score(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task whose adapter scores.")],
    inputs: Annotated[list[str], typer.Option("--input", "-i", help="An input text; repeat, paired with --target.")],
    targets: Annotated[list[str], typer.Option("--target", "-t", help="A target text; repeat, one per --input.")],
) -> None:
    """Score each --target given the --input at the same position."""

    _call(ctx, lambda client: asdict(client.score(task, inputs, targets)))


@app.command()
def upload(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task to install the adapter for.")],
    files: Annotated[list[Path], typer.Argument(help="Adapter file(s).", exists=True, dir_okay=False, readable=True)],
) -> None:
    """Upload FILES as TASK's next adapter version (needs --token when the server has one)."""
    _call(ctx, lambda client: client.upload(task, files).to_json())


Residency = Annotated[bool, typer.Option("--residency", help="Also show where the weights are (tier, pinned, bytes).")]


@app.command("list")
def list_adapters(
    ctx: typer.Context,
    residency: Residency = False,
    as_json: Annotated[bool, typer.Option("--json", help="Everything each adapter has, as JSON.")] = False,
) -> None:
    """List the adapters the server serves (every page, in task order): one line each, or --json."""
    adapters = _call(ctx, lambda client: [a.to_json() for a in client.list_adapters(residency)], echo=as_json)
    if not as_json:
        for a in adapters:
            typer.echo(_line(a))


def _line(adapter: dict[str, Any]) -> str:
    """task, version, method, parameters, the sha256's start; with residency: tier, pinned."""
    fields = [adapter["task"], f"v{adapter['version']}", adapter["method"], f"{adapter['params']:,} params"]
    fields.append(str(adapter["sha256"])[:12])
    where = adapter.get("residency")
    if where:
        fields.append(where["tier"] + (" pinned" if where.get("pinned") else ""))
    return "  ".join(fields)


@app.command()
def pin(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task to keep on the device.")],
    undo: Annotated[bool, typer.Option("--undo", help="Unpin: back to the device tier's LRU.")] = False,
) -> None:
    """Keep TASK's adapter on the server's device, never evicted (needs --token when the server has one)."""
    _call(ctx, lambda client: client.pin_adapter(task, not undo).to_json())


@app.command()
def delete(ctx: typer.Context, task: Annotated[str, typer.Argument(help="Task to stop serving.")]) -> None:
    """Delete TASK's adapter (needs --token when the server has one)."""

    def action(client: KronserveClient) -> dict[str, Any]:
        client.delete_adapter(task)
        return {"task": task, "deleted": True}

    _call(ctx, action)


@app.command()
def get(
    ctx: typer.Context, task: Annotated[str, typer.Argument(help="Task to describe.")], residency: Residency = False
) -> None:
    """Show TASK's active adapter: version, method, parameter count, sha256 and spec."""
    _call(ctx, lambda client: client.get_adapter(task, residency).to_json())


@app.command()
def health(ctx: typer.Context) -> None:
    """Liveness and readiness as JSON; exit 1 unless the server is ready to serve."""

    def action(client: KronserveClient) -> dict[str, bool]:
        return {"live": client.healthz(), "ready": client.readyz()}

    if not _call(ctx, action)["ready"]:  # a failure for the scripts that wait on this command
        raise typer.Exit(1)


@app.command("upload-dir")
def upload_dir(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Folder of adapter files.", exists=True, file_okay=False)],
    pattern: Annotated[str, typer.Option("--pattern", help="Which files: one task each.")] = "*.safetensors",
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Uploads in flight at once.")] = 8,
) -> None:
    """Upload every file in DIRECTORY matching --pattern, each as the task named by its file name (sst2.safetensors:
    task sst2). Prints one result per file; exit 1 if any upload failed (the others still land)."""
    files = sorted(p for p in directory.glob(pattern) if p.is_file())
    if not files:
        typer.echo(f"error: no file in {directory} matches {pattern!r}", err=True)
        raise typer.Exit(1)
    settings: _Settings = ctx.obj

    def one(client: KronserveClient, path: Path) -> dict[str, Any]:
        task = path.stem
        try:
            return {"task": task, "file": str(path), "version": client.upload(task, [path]).version}
        except KronserveClientError as exc:
            return {"task": task, "file": str(path), "error": f"{exc.status} {exc.code}: {exc.message}"}

    with make_client(settings.url, settings.token, settings.retries) as client, ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one(client, p), files))
    typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
    if any("error" in r for r in results):
        raise typer.Exit(1)

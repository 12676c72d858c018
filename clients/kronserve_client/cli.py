"""`kronserve-client`: the REST API from a shell, JSON on stdout so replies pipe into jq and scripts.

Errors go to stderr as one `error: <status> <code>: <message>` line with exit status 1, so scripts can tell a failed
call from its output without parsing it.
"""

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from .client import KronserveClient
from .errors import KronserveClientError

__all__ = ["DEFAULT_URL", "app", "make_client"]

DEFAULT_URL = "http://127.0.0.1:8000"

app = typer.Typer(
    name="kronserve-client",
    help="Call a kronserve server: predict, score, and manage adapters.",
    no_args_is_help=True,
    add_completion=False,
)


def make_client(url: str, token: str | None) -> KronserveClient:
    """The one place the CLI builds its client; tests replace it to put a mock transport underneath."""
    return KronserveClient(url, token=token)


@dataclass(frozen=True, slots=True)
class _Settings:
    url: str
    token: str | None


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
) -> None:
    ctx.obj = _Settings(url=url, token=token or None)


def _call(ctx: typer.Context, action: Callable[[KronserveClient], Any]) -> None:
    """Run one client call and print its JSON; every failure becomes one stderr line and exit status 1."""
    settings: _Settings = ctx.obj
    try:
        with make_client(settings.url, settings.token) as client:
            result = action(client)
    except KronserveClientError as exc:
        typer.echo(f"error: {exc.status} {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    except httpx.HTTPError as exc:  # no reply at all: refused, timed out, bad URL
        typer.echo(f"error: cannot reach {settings.url}: {exc or type(exc).__name__}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(result, indent=2, ensure_ascii=False))


@app.command()
def predict(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task whose adapter generates.")],
    inputs: Annotated[list[str], typer.Argument(help="Input texts, one output each.")],
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1, help="default: the server's")] = None,
    num_beams: Annotated[int, typer.Option("--num-beams", min=1)] = 1,
) -> None:
    """Generate outputs for INPUTS with TASK's adapter."""

    _call(ctx, lambda client: asdict(client.predict(task, inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)))


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


@app.command("list")
def list_adapters(ctx: typer.Context) -> None:
    """List the adapters the server serves."""
    _call(ctx, lambda client: [a.to_json() for a in client.list_adapters()])


@app.command()
def delete(ctx: typer.Context, task: Annotated[str, typer.Argument(help="Task to stop serving.")]) -> None:
    """Delete TASK's adapter (needs --token when the server has one)."""

    def action(client: KronserveClient) -> dict[str, Any]:
        client.delete_adapter(task)
        return {"task": task, "deleted": True}

    _call(ctx, action)

"""Task ids that try to leave the store, and links planted in it. A bad id is refused (4xx, error JSON) by every
route that takes one and creates nothing anywhere; a planted symlink (or a file where a task's directory belongs) is
never followed: the task is not served, PUT is 409 `store_conflict`, and what the link points at is unchanged."""

from __future__ import annotations

import http.client
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from kronserve.store import LocalStore

from ..e2e.conftest import Server
from .conftest import TIMEOUT, Payload, Reference, ask, error_code, tree

GOOD = "good"
# Raw path segment after /v1/adapters/ (sent byte for byte, no client-side normalization) -> status on PUT, GET and
# DELETE. 422: routed, the id fails the pattern (`validation_error`); 404: no route for the path (`not_found`).
NAMES = {
    "dot-dot": ("..", 422),
    "dot-dot, encoded": ("%2e%2e", 422),
    "dot-dot, upper-case encoding": ("%2E%2E", 422),
    "dot": (".", 422),
    "slash": ("a/b", 404),
    "slash, encoded": ("a%2fb", 404),
    "traversal": ("../../etc/passwd", 404),
    "traversal, encoded": ("..%2f..%2fetc%2fpasswd", 404),
    "absolute path": ("/etc/passwd", 404),
    "absolute path, encoded": ("%2Fetc%2Fpasswd", 404),
    "NUL": ("a%00b", 422),
    "NUL alone": ("%00", 422),
    "newline": ("abc%0a", 422),
    "65 characters": ("a" * 65, 422),
    "upper case": ("Good", 422),
    "space": ("a%20b", 422),
}
CODES = {404: "not_found", 422: "validation_error"}
PLANTED = ("linked", "pointed", "plain")  # store/linked -> a task directory outside; store/pointed/ACTIVE -> a file
# outside; store/plain is a regular file where a task's directory belongs


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("names")


@pytest.fixture(scope="module")
def server(tiny_dir: Path, root: Path, payload: Payload) -> Iterator[Server]:
    """A server whose store was planted, before it started, with links to valid task files outside it."""
    outside, store = LocalStore(root / "outside"), root / "store"
    for task in ("linked", "pointed"):
        outside.activate(outside.write(task, payload(task, seed=41)))
    store.mkdir()
    os.symlink(root / "outside" / "linked", store / "linked")
    (store / "pointed").mkdir()
    version_file = next((root / "outside" / "pointed").glob("v*.safetensors"))
    shutil.copy(version_file, store / "pointed" / version_file.name)
    os.symlink(root / "outside" / "pointed" / "ACTIVE", store / "pointed" / "ACTIVE")
    (store / "plain").write_bytes(b"not a directory")
    s = Server(tiny_dir, store).start()
    r = request(s, "PUT", f"/v1/adapters/{GOOD}", payload(GOOD, seed=40))
    assert r.status == 201, r.body
    yield s
    s.stop()


@dataclass(frozen=True)
class Raw:
    status: int
    body: bytes

    def refusal(self) -> tuple[int, str]:
        """(status, code) of a refusal in the documented shape `{"error": {"code", "message"}}`."""
        body = json.loads(self.body)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"} and body["error"]["message"], body
        return self.status, body["error"]["code"]


def request(s: Server, method: str, path: str, body: bytes | None = None) -> Raw:
    """The path exactly as given (httpx would normalize `..` and re-encode)."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
    headers = {"content-type": "application/octet-stream"} if body is not None else {}
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return Raw(response.status, response.read())
    finally:
        conn.close()


def snapshot(root: Path, s: Server) -> dict[str, str]:
    return tree(root, skip=(s.log,))  # the log grows; its name is still checked


@pytest.mark.parametrize("case", list(NAMES))
def test_bad_task_id_is_refused_everywhere_and_creates_nothing(
    root: Path, server: Server, payload: Payload, case: str
) -> None:
    name, status = NAMES[case]
    before = snapshot(root, server)
    for method, body in (("PUT", payload(GOOD, seed=42)), ("GET", None), ("DELETE", None)):
        r = request(server, method, f"/v1/adapters/{name}", body)
        assert r.refusal() == (status, CODES[status]), (method, r.body)
    for path, extra in (("predict", {}), ("score", {"targets": ["y"]})):
        r = httpx.post(f"{server.url}/v1/{path}", json={"task": unquote(name), "inputs": ["x"], **extra})
        assert r.status_code == 422 and error_code(r) == "validation_error", r.text
    assert snapshot(root, server) == before
    assert [e["task"] for e in httpx.get(f"{server.url}/v1/adapters", timeout=TIMEOUT).json()] == [GOOD]


@pytest.mark.parametrize("task", PLANTED)
def test_planted_link_is_never_followed(
    root: Path, server: Server, payload: Payload, reference: Reference, task: str
) -> None:
    before = snapshot(root, server)
    r = request(server, "PUT", f"/v1/adapters/{task}", payload(task, seed=43))
    assert r.refusal() == (409, "store_conflict"), r.body
    for method in ("GET", "DELETE"):
        r = request(server, method, f"/v1/adapters/{task}")
        assert r.refusal() == (404, "unknown_task"), (method, r.body)
    for path, extra in (("predict", {}), ("score", {"targets": ["y"]})):
        r = httpx.post(f"{server.url}/v1/{path}", json={"task": task, "inputs": ["x"], **extra}, timeout=TIMEOUT)
        assert r.status_code == 404 and error_code(r) == "unknown_task", r.text
    assert snapshot(root, server) == before  # the links, their targets and the outside files as they were
    assert [e["task"] for e in httpx.get(f"{server.url}/v1/adapters", timeout=TIMEOUT).json()] == [GOOD]
    version, answer = ask(server.url, GOOD)
    assert version == 1 and answer.matches(reference.answer(payload(GOOD, seed=40)))

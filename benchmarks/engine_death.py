"""A dead engine is a restart, not an outage: how fast, measured.

`kronserve serve` over a tiny random T5 with one Compacter task; a 32-row request of 512 new tokens runs; after
a second the engine process is SIGKILLed. Prints when the request in flight was answered (503
`engine_restarting`) and when `/readyz` was 200 again, both counted from the kill, and the first start's time.
Last line: `engine_death answered_s=A ready_again_s=B` (goals: A ≤ 2, B ≤ the backbone's load time + 5).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _server import Server

from kronserve.backbone import load_backbone, write_tiny_backbone
from kronserve.formats.native import AdapterFile, dumps
from kronserve.methods import init_tensors, preset

LONG = {"task": "a", "inputs": ["a long generation"] * 32, "max_new_tokens": 512, "min_new_tokens": 512}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        backbone_dir = write_tiny_backbone(work / "backbone", "tiny", seed=0)
        bb = load_backbone(str(backbone_dir), device="cpu")
        spec = preset("compacter")
        data = dumps(AdapterFile("a", spec, bb.fingerprint, init_tensors(spec, bb.fingerprint.geometry, seed=0)))
        server = Server(backbone_dir, work / "store", work / "server.log", {"KRONSERVE_LOG_LEVEL": "warning"})
        started = time.monotonic()
        server.start()
        print(f"first start to ready: {time.monotonic() - started:.2f} s")
        try:
            httpx.put(f"{server.url}/v1/adapters/a", files={"file": data}).raise_for_status()
            answers: list[tuple[httpx.Response, float]] = []

            def post() -> None:
                r = httpx.post(f"{server.url}/v1/predict", json=LONG, timeout=120)
                answers.append((r, time.monotonic()))

            request = threading.Thread(target=post)
            request.start()
            time.sleep(1.0)
            killed = time.monotonic()
            os.kill(server.engine_pid, signal.SIGKILL)
            request.join()
            ((answer, answered),) = answers
            while httpx.get(f"{server.url}/readyz", timeout=10).status_code != 200:
                time.sleep(0.01)
            ready = time.monotonic() - killed
            code = answer.json().get("error", {}).get("code") if answer.status_code != 200 else "finished first"
            print(f"in flight: {answer.status_code} {code}, {answered - killed:.3f} s after the kill")
            print(f"engine_death answered_s={answered - killed:.3f} ready_again_s={ready:.2f}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()

"""Build and run the Serve application: one gateway (the `/v1` API) bound to N named replicas.

Each replica is its own single-replica deployment (`replica-0`…): the ring, not Serve's load
balancer, decides where a task goes, and Serve restarts a replica that dies under the same name.
`build_app` is the import path for `serve run` and a KubeRay `RayService` (see deploy/).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from ray import serve
from ray.serve import Application

from ..api.app import create_app
from ..backbone import default_backbone
from ..config import Settings
from .gateway import ClusterBackend
from .replica import Replica

log = logging.getLogger(__name__)
APP_NAME = "kronserve"
cluster_router = APIRouter()


@cluster_router.get("/v1/cluster")
async def cluster_replicas(request: Request) -> list[dict[str, Any]]:
    """Each replica's name, pid, readiness and the tasks it holds."""
    return await request.app.state.backend.replicas()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Gateway:
    async def __init__(self, settings: Settings, names: list[str], *replicas: Any) -> None:
        self.backend = ClusterBackend(settings, names, replicas)
        await self.backend.start()

    def check_health(self) -> None:
        """Serve restarts a gateway whose replica probe has stopped: its routing view would be frozen."""
        if not self.backend.probing:
            raise RuntimeError("the replica probe is not running")

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.backend.settings, self.backend)
        app.include_router(cluster_router)
        return app


def build(settings: Settings) -> Application:
    """The application graph. Replicas poll the store epoch (0.5 s unless set) even when Redis is given."""
    if settings.backbone is None:
        settings = settings.model_copy(update={"backbone": default_backbone(settings.cache_dir)})
    if not settings.store.startswith("s3://"):  # every Ray worker must find the same directory
        settings = settings.model_copy(update={"store": str(Path(settings.store).resolve())})
    names = [f"replica-{i}" for i in range(settings.replicas)]
    threads = max(1, (os.cpu_count() or 1) // settings.replicas)
    on_replicas = settings.model_copy(update={"store_poll_s": settings.store_poll_s or 0.5})
    resources = {"num_cpus": 0, "num_gpus": settings.replica_gpus}
    in_flight = settings.queue_size + settings.max_batch_rows  # the replica's scheduler, not Serve, says 503
    replicas = [
        Replica.options(name=name, max_ongoing_requests=in_flight, ray_actor_options=resources).bind(
            on_replicas, name, names, threads
        )
        for name in names
    ]
    gateway = Gateway.options(max_ongoing_requests=in_flight * settings.replicas)
    return gateway.bind(settings, names, *replicas)


def build_app(args: dict[str, Any]) -> Application:
    """`serve run kronserve.cluster.app:build_app replicas=2 backbone=t5-base store=s3://bucket/adapters`."""
    return build(Settings(**args))


def run(settings: Settings) -> None:
    """`kronserve cluster`: join (or start) Ray, deploy, serve until SIGTERM/SIGINT, then take it down."""
    import ray

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    own_head = settings.ray_address is None
    ray.init(address=settings.ray_address, include_dashboard=False, namespace=APP_NAME, log_to_driver=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(settings), name=APP_NAME, route_prefix="/")
    log.info("kronserve cluster: %d replicas on http://%s:%d", settings.replicas, settings.host, settings.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    if own_head:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(APP_NAME)

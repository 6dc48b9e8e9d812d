"""When the service is ready: the one line that says so, and ``/healthz`` until then.

An Ingress replica answers long before the models in the other stages are loaded (they start
in parallel). So each Ingress replica watches Serve's status of its own application until it is
RUNNING, which Serve reports once every deployment's replicas are constructed (models loaded)
and pass their health checks; then it logs one line with the URL to call, and ``/healthz``
answers 200 from then on. Before that ``/healthz`` answers 503 ``starting`` with Retry-After, so
a newcomer's ``curl -f``, a script's wait loop and a load balancer's probe all wait for the
whole DAG, not only for the Ingress. Once ready, a replica stays ready: a stage that dies later
is a fault of the requests it fails (503 with Retry-After), not of the liveness probe.
"""
from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve.schema import ApplicationStatus
from ray.serve.context import _get_global_client  # Serve's own client: the only way to the URL

logger = logging.getLogger("ray.serve")
POLL_S = 0.5
RETRY_AFTER_S = 2


def running(app_name: str) -> bool:
    """Whether Serve reports ``app_name`` RUNNING (a blocking call to the controller; Serve's
    status summary, asked every ``POLL_S`` while the replicas start)."""
    app = serve.status().applications.get(app_name)
    return app is not None and app.status == ApplicationStatus.RUNNING


def app_url(app_name: str) -> str:
    """Where clients reach ``app_name``, e.g. http://127.0.0.1:8000/ (a blocking call to the
    controller for Serve's full details: asked once, when the app is up)."""
    details = _get_global_client().get_serve_details()
    http = details["http_options"]
    host = "127.0.0.1" if http["host"] in ("0.0.0.0", "::") else http["host"]
    prefix = details["applications"][app_name].get("route_prefix") or "/"
    return f"http://{host}:{http['port']}{prefix}"


class Readiness:
    """Whether this Ingress replica's application is ready; ``watch()`` runs until it is."""

    def __init__(self, models: list[str]) -> None:
        self.ready = False
        self.models = models

    async def watch(self) -> None:
        app_name = serve.get_replica_context().app_name
        while not await self._running(app_name):
            await asyncio.sleep(POLL_S)
        self.ready = True
        try:
            url = await asyncio.to_thread(app_url, app_name)
        except Exception:  # the line still says ready; the port is serve_config.yaml's
            logger.debug("application URL not available", exc_info=True)
            url = "http://<http_options.host>:<http_options.port>/"
        logger.info("Raydiance is ready: %s (models: %s). Try: curl -sSf %sv1/generate "
                    "-H 'content-type: application/json' -d '{\"prompt\": \"a red circle "
                    "on a blue background\"}' -o image.png", url, ", ".join(self.models), url)

    @staticmethod
    async def _running(app_name: str) -> bool:
        try:
            return await asyncio.to_thread(running, app_name)
        except Exception:  # the controller restarting: ask again
            logger.debug("application status not available yet", exc_info=True)
            return False

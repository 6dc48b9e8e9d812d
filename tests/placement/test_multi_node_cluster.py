"""The GPU-cluster layout (cluster/serve_config.gpu.yaml) on a Ray cluster of several nodes.

Four raylets on this machine (``ray.cluster_utils.Cluster``), shaped as the file's header says a
real cluster is: a head with no CPUs for replicas, an aux node whose one (fake) GPU is advertised
as ``aux_gpu``, and two GPU nodes advertising ``unet_gpu`` per (fake) GPU. The shipped file is
deployed with only what this machine needs changed (the built-in model, CPU torch, one HTTP
proxy on loopback, autoscaling that reacts in seconds). Then: every replica is on the node the
file puts it on (read from the replica itself), images are the in-process pipeline's, the
Denoiser scales out onto the GPU nodes under load, and when a GPU node holding Denoisers is
removed mid-traffic, Serve brings them back on the other GPU node; no request hangs, and
requests succeed again.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from deployments.settings import PROJECT_ROOT  # noqa: E402
from pipeline.unet.cache_config import default_cache_config  # noqa: E402
from pipeline.request_params import DenoiseParams  # noqa: E402
from pipeline.generate import generate  # noqa: E402
from pipeline.loading import load_model  # noqa: E402
from tools.local_serve import deploy_config, free_port, wait_http  # noqa: E402
from tools.tiny_shapes import MODEL_DIR  # noqa: E402
from tools.traffic import Traffic, wait_for  # noqa: E402

from tests.integration.conftest import png_pixels  # noqa: E402

CONFIG = PROJECT_ROOT / "cluster" / "serve_config.gpu.yaml"
PROMPT = "a red circle on a blue background"
CLIENT_TIMEOUT_S = 180.0  # a request taking longer than this counts as hung


def cluster_config(port: int) -> dict:
    """The shipped GPU-cluster config, changed only where this machine differs."""
    config = yaml.safe_load(CONFIG.read_text())
    # every fake node shares 127.0.0.1: one proxy (on the head), on a free loopback port
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    args = app["args"]
    args.pop("checkpoints_dir")
    args.pop("loras_dir")
    # the built-in model; "auto": Ray hands out fake GPUs that torch cannot use
    args.update(models={"tiny-shapes": str(MODEL_DIR)}, default_model="tiny-shapes", accelerator="auto",
                limits={**args["limits"], "max_width": 256, "max_height": 256})
    for deployment in app["deployments"]:
        scaling = deployment.get("autoscaling_config")
        if scaling:  # react in seconds rather than the production half-minute
            scaling.update(upscale_delay_s=2, metrics_interval_s=1, look_back_period_s=4)
        if deployment["name"] == "Denoiser":
            scaling.update(max_replicas=2, target_ongoing_requests=4)
    return config


@dataclass
class FakeCluster:
    """The test cluster and its worker raylets (``ray._private.node.Node``, each with its node_id)."""

    nodes: object  # ray.cluster_utils.Cluster
    aux: object
    gpus: list

    @property
    def gpu_node_ids(self) -> set[str]:
        return {node.node_id for node in self.gpus}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # The nodes' workers import deployments/ whether or not the project is pip-installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        aux = nodes.add_node(num_cpus=6, num_gpus=1, resources={"aux_gpu": 1})
        gpus = [nodes.add_node(num_cpus=6, num_gpus=2, resources={"unet_gpu": 2}) for _ in range(2)]
        ray.init(address=nodes.address)
        nodes.wait_for_nodes(timeout=60)
        yield FakeCluster(nodes, aux, gpus)
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def service(cluster):
    port = free_port()
    deploy_config(cluster_config(port), timeout_s=300)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", timeout_s=60)
    return url


def placements(deployment: str, replicas: int, timeout_s: float = 120.0) -> dict[str, dict]:
    """Replica id -> placement report, once ``deployment`` has exactly ``replicas`` running and
    each of them has answered (idle replicas are picked at random: a few dozen calls reach all)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, "raydiance")
    deadline = time.monotonic() + timeout_s
    while True:
        running = running_replicas(deployment)
        seen = {}
        for _ in range(12 * replicas):
            report = handle.placement.remote().result(timeout_s=30)
            seen[report["replica"]] = report
        if running == replicas == len(seen) == running_replicas(deployment):
            return seen
        if time.monotonic() > deadline:
            raise TimeoutError(f"{deployment}: {running} running, {len(seen)} answered; wanted {replicas}")
        time.sleep(1)


def running_replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications["raydiance"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def in_process_pixels(seed: int, steps: int) -> np.ndarray:
    params = DenoiseParams(64, 64, steps=steps, guidance_scale=5.0, seed=seed, sampler="Euler",
                           cache=default_cache_config("sd15"))
    return generate(load_model(MODEL_DIR), PROMPT, params).pixels


def test_every_replica_lands_where_the_config_puts_it_and_draws_right(cluster, service):
    for stage in ("TextEncoder", "VAEDecoder", "Denoiser"):
        (report,) = placements(stage, 1).values()
        expected = cluster.gpu_node_ids if stage == "Denoiser" else {cluster.aux.node_id}
        assert report["node_id"] in expected, stage
        assert report["gpu_ids"], stage  # Ray gave it (a share of) a GPU on that node
        assert report["device"] == "cpu"  # ...which torch cannot see here

    response = httpx.post(f"{service}/v1/generate", timeout=120, json={
        "prompt": PROMPT, "seed": 3, "steps": 10, "guidance_scale": 5.0, "sampler": "Euler"})
    assert response.status_code == 200, response.text
    got = png_pixels(response.content).astype(int)
    assert np.abs(got - in_process_pixels(3, 10).astype(int)).max() <= 1


def test_the_denoiser_scales_out_onto_the_gpu_nodes_under_load(cluster, service):
    with Traffic(service, clients=12, body={"prompt": PROMPT, "steps": 20},
                 timeout_s=CLIENT_TIMEOUT_S):
        reports = placements("Denoiser", 2, timeout_s=180)
    assert {r["node_id"] for r in reports.values()} <= cluster.gpu_node_ids
    cards = {(r["node_id"], gpu) for r in reports.values() for gpu in r["gpu_ids"]}
    assert len(cards) == 2  # one whole card each


def ingress_node() -> str:
    """The node of the Ingress replica (from the GCS's actor table: no dashboard here)."""
    import ray._private.state

    (node,) = [actor["Address"]["NodeID"] for actor in
               ray._private.state.actors(actor_state_name="ALIVE").values()
               if "raydiance#Ingress#" in actor["Name"]]
    return node


def test_removing_a_gpu_node_mid_traffic_moves_its_denoisers_and_service_resumes(cluster, service):
    hosts = [r["node_id"] for r in placements("Denoiser", 2).values()]
    ingress = ingress_node()
    # the node with the most Denoisers, one without the Ingress where that still removes one
    doomed = max(cluster.gpus, key=lambda node: (hosts.count(node.node_id) > 0,
                                                 node.node_id != ingress, hosts.count(node.node_id)))
    (survivor,) = [node for node in cluster.gpus if node is not doomed]
    with Traffic(service, clients=4, body={"prompt": PROMPT, "steps": 8},
                 timeout_s=CLIENT_TIMEOUT_S) as traffic:
        wait_for(lambda: traffic.successes_since(0) >= 2, 120, "requests served before the removal")
        removed_at = time.monotonic()
        cluster.nodes.remove_node(doomed)
        wait_for(lambda: traffic.successes_since(removed_at + 1) >= 3, 240,
                 "requests served again after a GPU node was removed")
        reports = placements("Denoiser", 2, timeout_s=240)  # the lost replicas, started again
    assert {r["node_id"] for r in reports.values()} == {survivor.node_id}
    statuses = [o.status for o in traffic.outcomes]
    assert all(s == 200 or (isinstance(s, int) and s >= 500) for s in statuses), statuses  # answered
    if doomed.node_id != ingress:  # the Ingress lived: a lost Denoiser's requests get 503 + Retry-After
        failed = [(o.status, o.response.headers.get("retry-after") if o.response else None)
                  for o in traffic.outcomes if o.status != 200]
        assert all(s == 503 and retry for s, retry in failed), failed
    assert max(o.seconds for o in traffic.outcomes) < CLIENT_TIMEOUT_S

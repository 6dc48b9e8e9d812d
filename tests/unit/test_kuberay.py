"""The KubeRay RayService (cluster/kuberay/rayservice.yaml), checked without a cluster.

Nothing here starts Ray or talks to Kubernetes: the embedded Serve config goes through Ray's own
schema and the app builder, the pod templates through the ``kubernetes`` package's models, and the
worker groups are checked to advertise, and hold, what the deployments ask Ray for. A mistake in
any of these otherwise shows only on a GPU cluster, as a deploy that fails or a replica that stays
pending.
"""
from __future__ import annotations

import inspect
import json
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from deployments.app import build_app
from deployments.settings import PROJECT_ROOT, AppArgs
from tools.tiny_shapes import MODEL_DIR

RAYSERVICE = PROJECT_ROOT / "cluster" / "kuberay" / "rayservice.yaml"
DOCKERFILE = PROJECT_ROOT / "cluster" / "kuberay" / "Dockerfile"
GPU_CONFIG = PROJECT_ROOT / "cluster" / "serve_config.gpu.yaml"
MODELS_MOUNT = "/models"
MODELS_CLAIM = "raydiance-models"
EPS = 1e-9


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return yaml.safe_load(RAYSERVICE.read_text())


@pytest.fixture(scope="module")
def serve_config(rayservice) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def groups(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The head group (as "head") and every worker group, by name."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"],
            **{group["groupName"]: group for group in cluster["workerGroupSpecs"]}}


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def custom_resources(group: dict[str, Any]) -> dict[str, float]:
    """The `resources` rayStartParam: a JSON object quoted once more, as KubeRay expects."""
    raw = group["rayStartParams"].get("resources")
    return {} if raw is None else json.loads(json.loads(raw))


def advertised(group: dict[str, Any]) -> dict[str, float]:
    """What one pod of the group offers Ray: CPU and GPU as KubeRay derives them, custom resources."""
    from kubernetes.utils import parse_quantity

    params, limits = group["rayStartParams"], ray_container(group)["resources"]["limits"]
    return {"CPU": float(params.get("num-cpus", parse_quantity(limits["cpu"]))),
            "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
            **{name: float(amount) for name, amount in custom_resources(group).items()}}


def demand(deployment: dict[str, Any]) -> dict[str, float]:
    """What one replica asks Ray for."""
    options = deployment.get("ray_actor_options", {})
    return {"CPU": float(options.get("num_cpus", 1)), "GPU": float(options.get("num_gpus", 0)),
            **{name: float(amount) for name, amount in options.get("resources", {}).items()}}


def max_replicas(deployment: dict[str, Any]) -> int:
    scaling = deployment.get("autoscaling_config")
    return scaling["max_replicas"] if scaling else deployment.get("num_replicas", 1)


def deserialize(data: dict[str, Any], kind: str) -> Any:
    """``data`` through the kubernetes package's model ``kind``, as the API client reads a reply."""
    from kubernetes.client import ApiClient

    api, text = ApiClient(), json.dumps(data)
    if "response_text" in inspect.signature(api.deserialize).parameters:  # kubernetes >= 35
        return api.deserialize(text, kind, "application/json")
    return api.deserialize(SimpleNamespace(data=text), kind)


def test_it_is_a_rayservice_on_the_images_ray(rayservice):
    import ray

    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    version = rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    assert version == ray.__version__  # the version pyproject pins
    assert f"FROM rayproject/ray:{version}-" in DOCKERFILE.read_text()
    images = {ray_container(group)["image"] for group in groups(rayservice).values()}
    assert len(images) == 1, f"every Ray pod must run the same image (same Ray, same Python): {images}"


def test_embedded_serve_config_is_the_gpu_config_and_ray_accepts_it(serve_config):
    from ray.serve.schema import ServeDeploySchema

    assert serve_config == yaml.safe_load(GPU_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(serve_config)
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app"
    assert schema.http_options.port == 8000  # the port of raydiance-serve-svc


def test_build_app_accepts_the_embedded_args(serve_config, tmp_path):
    import ray
    from ray import serve
    from ray.serve._private.build_app import build_app as ray_build_app

    (app,) = serve_config["applications"]
    args = app["args"]
    parsed = AppArgs.model_validate(args)  # every key and value as written
    on_volume = [*parsed.models.values(), parsed.checkpoints_dir, parsed.loras_dir]
    assert all(path.startswith(MODELS_MOUNT + "/") for path in on_volume), on_volume

    # /models exists only in the pods: only the paths change, every other arg is built as written.
    local = {**args, "models": {name: str(MODEL_DIR) for name in args["models"]},
             "checkpoints_dir": str(tmp_path), "loras_dir": str(tmp_path)}
    application = build_app(local)
    assert isinstance(application, serve.Application)
    assert not ray.is_initialized()  # accelerator: cuda places on GPUs without asking a cluster
    built = ray_build_app(application, name=app["name"])
    by_name = {deployment.name: deployment for deployment in built.deployments}
    assert by_name["Denoiser"].ray_actor_options["num_gpus"] >= 1
    # Serve refuses a config that names a deployment the application does not have.
    assert {deployment["name"] for deployment in app["deployments"]} == set(by_name)


@pytest.mark.parametrize("name", ["head", "unet-gpu", "aux-gpu"])
def test_pod_template_deserializes_and_mounts_the_models_read_only(rayservice, name):
    from kubernetes.client import ApiClient
    from kubernetes.utils import parse_quantity

    group = groups(rayservice)[name]
    pod = deserialize(group["template"], "V1PodTemplateSpec")
    # The models drop keys they do not know: a round trip that loses nothing has no misspelt key.
    assert ApiClient().sanitize_for_serialization(pod) == group["template"]

    container = pod.spec.containers[0]
    assert container.resources.requests == container.resources.limits  # Guaranteed: never evicted first
    assert {"cpu", "memory"} <= set(container.resources.limits)
    env = {var.name: var.value for var in container.env}
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["HF_HUB_OFFLINE"] == "1"

    volumes = {volume.name: volume for volume in pod.spec.volumes}
    mounts = {mount.mount_path: mount for mount in container.volume_mounts}
    models = mounts[MODELS_MOUNT]
    assert models.read_only
    claim = volumes[models.name].persistent_volume_claim
    assert claim.claim_name == MODELS_CLAIM and claim.read_only

    shm = volumes[mounts["/dev/shm"].name].empty_dir  # Ray's object store
    assert shm.medium == "Memory"
    store = group["rayStartParams"].get("object-store-memory")
    assert store is not None and parse_quantity(shm.size_limit) >= int(store)


def test_ray_start_params_are_strings_and_the_head_holds_no_replicas(rayservice):
    for name, group in groups(rayservice).items():
        wrong = {key: value for key, value in group["rayStartParams"].items() if not isinstance(value, str)}
        assert not wrong, f"{name}: KubeRay takes rayStartParams as strings only: {wrong}"
    head = groups(rayservice)["head"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {port["name"]: port["containerPort"] for port in ray_container(head)["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}
    assert head["rayStartParams"]["metrics-export-port"] == str(ports["metrics"])


@pytest.mark.parametrize("name", ["unet-gpu", "aux-gpu"])
def test_gpu_group_gives_ray_the_gpus_it_asks_kubernetes_for(rayservice, name):
    group = groups(rayservice)[name]
    resources = ray_container(group)["resources"]
    gpus = int(resources["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and int(group["rayStartParams"]["num-gpus"]) == gpus
    assert int(resources["requests"]["nvidia.com/gpu"]) == gpus
    assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_every_deployment_lands_on_a_worker_group_that_holds_all_its_replicas(rayservice, serve_config):
    workers = {name: group for name, group in groups(rayservice).items() if name != "head"}
    offers = {name: advertised(group) for name, group in workers.items()}
    # A custom resource names the group a deployment must land on.
    owner = {resource: name for name, offer in offers.items() for resource in offer
             if resource not in ("CPU", "GPU")}
    bound: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
    (app,) = serve_config["applications"]
    for deployment in app["deployments"]:
        wanted = demand(deployment)
        custom = [resource for resource in wanted if resource not in ("CPU", "GPU")]
        missing = [resource for resource in custom if resource not in owner]
        assert not missing, f"{deployment['name']}: no worker group advertises {missing}"
        if wanted["GPU"] > 0:
            assert custom, f"{deployment['name']} takes a GPU without a custom resource naming its card"
        homes = {owner[resource] for resource in custom} or set(workers)
        fits = [name for name in homes
                if all(offers[name].get(resource, 0) + EPS >= amount for resource, amount in wanted.items())]
        assert fits, f"{deployment['name']} ({wanted}) fits no pod of {sorted(homes)}: {offers}"
        if custom:
            (home,) = homes
            bound[home].append(deployment)

    # At their max_replicas, the deployments bound to a group fit its pods at maxReplicas.
    for name, deployments in bound.items():
        capacity = {resource: amount * workers[name]["maxReplicas"] for resource, amount in offers[name].items()}
        for resource in capacity:
            needed = sum(max_replicas(deployment) * demand(deployment).get(resource, 0)
                         for deployment in deployments)
            assert needed <= capacity[resource] + EPS, (
                f"{name}: its deployments at max_replicas need {needed} {resource}, "
                f"{workers[name]['maxReplicas']} pods hold {capacity[resource]}")
    assert any(bound.values())

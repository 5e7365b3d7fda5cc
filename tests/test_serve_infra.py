"""infra/rayservice.yaml runs the Serve app that `subjectforge serve` runs, in pods like the
RayCluster's: same image, MLflow credentials, Ray token, volume and labels (so the
NetworkPolicies of infra/raycluster.yaml guard them); infra/serve-ingress.yaml puts a front
proxy before it whose limits are the app's."""

import importlib
from pathlib import Path

import yaml

from pipeline.config import load_config

INFRA = Path(__file__).resolve().parent.parent / "infra"
# What the RayService's pods carry beside the RayCluster's labels (infra/serve-ingress.yaml selects it).
SERVE_POD_LABEL = {"app.kubernetes.io/instance": "subjectforge-serve"}


def manifest(name, kind):
    [doc] = [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d and d["kind"] == kind]
    return doc


def pods(cluster_spec):
    yield cluster_spec["headGroupSpec"]["template"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["template"]


def ray_pod_labels():
    """The labels every pod of the RayCluster carries, which its NetworkPolicies select."""
    [labels] = {yaml.safe_dump(p["metadata"]["labels"]) for p in pods(manifest("raycluster.yaml", "RayCluster")["spec"])}
    return yaml.safe_load(labels)


def test_rayservice_pods_match_the_rayclusters():
    cluster = manifest("raycluster.yaml", "RayCluster")["spec"]
    service = manifest("rayservice.yaml", "RayService")["spec"]
    reference = cluster["headGroupSpec"]["template"]["spec"]
    for pod in pods(service["rayClusterConfig"]):
        # The RayCluster's labels, plus the one that tells serve pods apart for the ingress's NetworkPolicy.
        assert pod["metadata"]["labels"] == {**ray_pod_labels(), **SERVE_POD_LABEL}
        [container] = pod["spec"]["containers"]
        assert container["image"] == reference["containers"][0]["image"]
        assert container["env"] == reference["containers"][0]["env"]
        assert container["volumeMounts"] == reference["containers"][0]["volumeMounts"]
        assert pod["spec"]["volumes"] == reference["volumes"]
    assert service["rayClusterConfig"]["rayVersion"] == cluster["rayVersion"]


def serve_config():
    return yaml.safe_load(manifest("rayservice.yaml", "RayService")["spec"]["serveConfigV2"])


def served_config():
    """The subjectforge config the RayService's app loads."""
    [app] = serve_config()["applications"]
    # The image installs the project at /app (infra/Dockerfile): the config path is the package's file.
    config_path = Path(app["args"]["config"])
    assert config_path.parts[:2] == ("/", "app")
    return load_config(Path(__file__).resolve().parent.parent / config_path.relative_to("/app"))


def test_rayservice_app_imports_and_its_config_loads():
    [app] = serve_config()["applications"]
    module, _, name = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    config, http = served_config(), serve_config()["http_options"]
    assert config.serve.host == "0.0.0.0" and http["port"] == config.serve.port
    assert http["request_timeout_s"] == config.serve.request_timeout_s


NGINX_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def nginx_size(text):
    """Bytes of an nginx size ("48m": 48 MiB)."""
    text = str(text).strip().lower()
    unit = text[-1] if text[-1] in NGINX_UNITS else ""
    return int(text.removesuffix(unit)) * NGINX_UNITS[unit]


def test_the_front_proxy_holds_slow_and_large_clients_to_the_serve_configs_limits():
    """infra/serve-ingress.yaml: trickled bodies wait at nginx, not in a replica's slots, and
    nginx's limits are the app's (cluster-serve.yaml, which keeps the serve.* defaults)."""
    serve = served_config().serve
    ingress = manifest("serve-ingress.yaml", "Ingress")
    notes = {k.removeprefix("nginx.ingress.kubernetes.io/"): v for k, v in ingress["metadata"]["annotations"].items()}
    assert nginx_size(notes["proxy-body-size"]) == int(serve.max_request_mb * 2**20)
    assert notes["proxy-request-buffering"] == "on"
    # Serve gives up on a request first and answers it, rather than nginx cutting it with a 504.
    assert float(notes["proxy-read-timeout"]) > serve.request_timeout_s
    # One client address cannot take a replica's slots and queue (the deployment's max_ongoing_requests + max_queued_requests).
    assert 0 < int(notes["limit-connections"]) < 2 * serve.max_batch_size + serve.max_queued_requests
    assert int(notes["limit-rps"]) > 0
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    service = manifest("rayservice.yaml", "RayService")["metadata"]["name"]
    assert path["backend"]["service"] == {"name": f"{service}-serve-svc", "port": {"number": serve.port}}

    controller = manifest("serve-ingress.yaml", "ConfigMap")["data"]
    for key in ("client-header-timeout", "client-body-timeout"):  # seconds between two reads
        assert 0 < int(controller[key]) <= 60 < serve.request_timeout_s
    count, size = controller["large-client-header-buffers"].split()
    assert nginx_size(controller["client-header-buffer-size"]) + int(count) * nginx_size(size) <= 2**20  # Serve's proxy took 64 MB
    assert controller["limit-req-status-code"] == controller["limit-conn-status-code"] == "429"


def test_only_the_ingress_controller_reaches_serve_and_only_on_the_serve_pods():
    serve = served_config().serve
    policy = manifest("serve-ingress.yaml", "NetworkPolicy")["spec"]
    selector = policy["podSelector"]["matchLabels"]
    assert selector == {**ray_pod_labels(), **SERVE_POD_LABEL}  # not the training cluster's pods
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"port": serve.port}]
    [peer] = rule["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}

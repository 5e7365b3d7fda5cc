"""infra/rayservice.yaml runs the Serve app that `subjectforge serve` runs, in pods like the
RayCluster's: same image, MLflow credentials, Ray token, volume and labels (so the
NetworkPolicies of infra/raycluster.yaml guard them)."""

import importlib
from pathlib import Path

import yaml

from pipeline.config import load_config

INFRA = Path(__file__).resolve().parent.parent / "infra"


def manifest(name, kind):
    [doc] = [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d and d["kind"] == kind]
    return doc


def pods(cluster_spec):
    yield cluster_spec["headGroupSpec"]["template"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["template"]


def test_rayservice_pods_match_the_rayclusters():
    cluster = manifest("raycluster.yaml", "RayCluster")["spec"]
    service = manifest("rayservice.yaml", "RayService")["spec"]
    [ray_pod] = {yaml.safe_dump(p["metadata"]["labels"]) for p in pods(cluster)}
    reference = cluster["headGroupSpec"]["template"]["spec"]
    for pod in pods(service["rayClusterConfig"]):
        assert yaml.safe_dump(pod["metadata"]["labels"]) == ray_pod
        [container] = pod["spec"]["containers"]
        assert container["image"] == reference["containers"][0]["image"]
        assert container["env"] == reference["containers"][0]["env"]
        assert container["volumeMounts"] == reference["containers"][0]["volumeMounts"]
        assert pod["spec"]["volumes"] == reference["volumes"]
    assert service["rayClusterConfig"]["rayVersion"] == cluster["rayVersion"]


def test_rayservice_app_imports_and_its_config_loads():
    serve_config = yaml.safe_load(manifest("rayservice.yaml", "RayService")["spec"]["serveConfigV2"])
    [app] = serve_config["applications"]
    module, _, name = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    # The image installs the project at /app (infra/Dockerfile): the config path is the package's file.
    config_path = Path(app["args"]["config"])
    assert config_path.parts[:2] == ("/", "app")
    config = load_config(Path(__file__).resolve().parent.parent / config_path.relative_to("/app"))
    assert config.serve.host == "0.0.0.0" and serve_config["http_options"]["port"] == config.serve.port

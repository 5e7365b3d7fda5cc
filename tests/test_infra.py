"""The manifests in infra/ parse, call real CLI commands with config files that load, and
refer to each other by names that exist."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline import __version__
from pipeline.cli import build_parser, resolve_config

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"


def load_all() -> list[dict]:
    docs = []
    for path in sorted(INFRA.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def rayjobs(docs):
    """RayJobs, including the template the CronJob creates from its ConfigMap."""
    jobs = list(by_kind(docs, "RayJob").values())
    for cm in by_kind(docs, "ConfigMap").values():
        for text in cm.get("data", {}).values():
            doc = yaml.safe_load(text)
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                jobs.append(doc)
    return jobs


def commands(entrypoint: str) -> list[list[str]]:
    """`subjectforge A && subjectforge B` -> [[A...], [B...]]."""
    out = []
    for part in entrypoint.split("&&"):
        words = shlex.split(part)
        assert words[0] == "subjectforge", f"entrypoint must call the CLI: {part!r}"
        out.append(words[1:])
    return out


def test_every_manifest_parses_with_known_kinds():
    docs = load_all()
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "CronJob", "Deployment", "Service", "PersistentVolumeClaim"} <= kinds
    assert rayjobs(docs), "no RayJob, not even the CronJob's template"
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"]
        if d["kind"] in ("RayCluster", "RayJob"):
            assert d["apiVersion"] == "ray.io/v1"


@pytest.mark.parametrize("job", rayjobs(load_all()), ids=lambda j: j["metadata"]["name"])
def test_rayjob_entrypoints_are_valid_cli_calls_with_loadable_configs(job):
    parser = build_parser()
    for argv in commands(job["spec"]["entrypoint"]):
        args = parser.parse_args(argv)  # SystemExit (a failure) on any unknown flag
        if getattr(args, "config", None):
            assert (ROOT / args.config).is_file(), f"{args.config} is not in the repo (the image's workdir)"
            args.config = str(ROOT / args.config)
        if hasattr(args._module, "apply_arguments"):
            args._module.apply_arguments(args)
        config = resolve_config(args)
        assert config.profile == "real", "cluster jobs must not run the random-weight tiny models"


def test_names_line_up():
    docs = load_all()
    clusters = by_kind(docs, "RayCluster")
    claims = set(by_kind(docs, "PersistentVolumeClaim"))
    services = by_kind(docs, "Service")
    for job in rayjobs(docs):
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] in clusters
    cluster = clusters["subjectforge"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1" and cluster["spec"]["enableInTreeAutoscaling"] is True
    assert groups["gpu-workers"]["minReplicas"] == 0 < groups["gpu-workers"]["maxReplicas"]
    pod_specs = [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]
    pod_specs += [d["spec"]["template"]["spec"] for d in by_kind(docs, "Deployment").values()]
    for spec in pod_specs:
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    env = {e["name"]: e.get("value") for e in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    host, port = re.match(r"http://([\w-]+):(\d+)$", env["MLFLOW_TRACKING_URI"]).groups()
    assert host in services and int(port) in [p["port"] for p in services[host]["spec"]["ports"]]


def test_cronjob_creates_a_rayjob_from_its_template_with_rights_to_do_so():
    docs = load_all()
    cron = by_kind(docs, "CronJob")["subjectforge-refresh"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    cm_name = pod["volumes"][0]["configMap"]["name"]
    template = by_kind(docs, "ConfigMap")[cm_name]["data"]
    script = pod["containers"][0]["command"][-1]
    file_name = re.search(r"/templates/([\w.-]+)", script).group(1)
    assert file_name in template and "__DATE__" in template[file_name] and "kubectl create" in script
    role = by_kind(docs, "Role")[by_kind(docs, "RoleBinding")["subjectforge-scheduler"]["roleRef"]["name"]]
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    assert pod["serviceAccountName"] in by_kind(docs, "ServiceAccount")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_scheduled_refresh_fine_tunes_only_the_affected_subjects_of_what_it_refreshed():
    [template] = [j for j in rayjobs(load_all()) if j["metadata"]["name"].startswith("subjectforge-refresh")]
    parser = build_parser()
    refresh, finetune = (parser.parse_args(argv) for argv in commands(template["spec"]["entrypoint"]))
    assert (refresh.command, refresh.action) == ("data", "refresh")
    assert finetune.command == "finetune-many" and finetune.affected
    assert finetune.data == f"{refresh.out}/latest"


def test_images_match_the_package_version():
    for path in INFRA.glob("*.yaml"):
        for tag in re.findall(r"image: subjectforge:([\w.-]+)", path.read_text()):
            assert tag == __version__, f"{path.name} runs subjectforge:{tag}, the package is {__version__}"
    assert f"subjectforge:{__version__}" in (INFRA / "Dockerfile").read_text()

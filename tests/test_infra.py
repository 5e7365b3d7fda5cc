"""The manifests in infra/ parse, call real CLI commands with config files that load, and
refer to each other by names that exist."""

import base64
import configparser
import fnmatch
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline import __version__
from pipeline.cli import build_parser, resolve_config
from tests.processes import stop_process_group

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
        for key, text in cm.get("data", {}).items():
            if not key.endswith((".yaml", ".yml")):
                continue
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


# ---------------------------------------------------------------------------------------------
# Security: MLflow logins, network policies, secrets, and what the image holds

ALL_PORTS = frozenset({"*"})


def pod_templates(docs) -> list[tuple[str, dict, dict]]:
    """(name, labels, pod spec) of every pod the manifests make: the Deployments', the Ray
    head's and workers', the RayJobs' submitters (the CronJob's template too) and the CronJob's."""
    pods = []
    for name, d in by_kind(docs, "Deployment").items():
        pods.append((f"deployment/{name}", d["spec"]["template"]))
    for name, c in by_kind(docs, "RayCluster").items():
        pods.append((f"{name}/head", c["spec"]["headGroupSpec"]["template"]))
        pods += [(f"{name}/{g['groupName']}", g["template"]) for g in c["spec"]["workerGroupSpecs"]]
    for job in rayjobs(docs):
        pods.append((f"{job['metadata']['name']}/submitter", job["spec"]["submitterPodTemplate"]))
    for name, cron in by_kind(docs, "CronJob").items():
        pods.append((f"cronjob/{name}", cron["spec"]["jobTemplate"]["spec"]["template"]))
    return [(name, t.get("metadata", {}).get("labels", {}), t["spec"]) for name, t in pods]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def reachable_ports(policy: dict, labels: dict) -> frozenset:
    """The ports a pod with `labels` may open on the pods `policy` selects."""
    ports: set = set()
    for rule in policy["spec"].get("ingress", []):
        if any(selects(peer.get("podSelector", {}), labels) for peer in rule["from"]):
            if "ports" not in rule:
                return ALL_PORTS
            ports |= {p["port"] for p in rule["ports"]}
    return frozenset(ports)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(entry: dict) -> tuple[str, str]:
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def mlflow_server(docs):
    deployment = by_kind(docs, "Deployment")["mlflow"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def test_mlflow_server_asks_for_a_login_from_a_secret():
    docs = load_all()
    deployment, server = mlflow_server(docs)
    script = server["command"][-1]
    assert "--app-name basic-auth" in " ".join(script.split())
    env = env_of(server)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "value" not in env[name] and secret_ref(env[name])[0] == "subjectforge-mlflow-auth"
    # The auth config is the mounted ConfigMap's file, and its user store is on the volume.
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    spec = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_map = volumes[mounts[str(config_path.parent)]]["configMap"]["name"]
    ini = configparser.ConfigParser()
    ini.read_string(by_kind(docs, "ConfigMap")[config_map]["data"][config_path.name])
    assert not ini.has_option("mlflow", "admin_password"), "the admin password belongs in the secret"
    store = ini["mlflow"]["database_uri"].removeprefix("sqlite:///")
    assert "persistentVolumeClaim" in volumes[mounts[str(Path(store).parent)]]
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"


def test_every_tracking_client_logs_in_with_the_servers_secret():
    from mlflow.server.security_utils import is_allowed_host_header

    docs = load_all()
    _, server = mlflow_server(docs)
    server_env = env_of(server)
    login = (secret_ref(server_env["MLFLOW_AUTH_ADMIN_USERNAME"]), secret_ref(server_env["MLFLOW_AUTH_ADMIN_PASSWORD"]))
    allowed_hosts = re.search(r'--allowed-hosts "([^"]+)"', server["command"][-1]).group(1).split(",")
    clients = 0
    for name, _, spec in pod_templates(docs):
        for container in spec["containers"]:
            env = env_of(container)
            if "MLFLOW_TRACKING_URI" not in env:
                continue
            clients += 1
            user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
            assert user and password, f"{name}: tracks to MLflow without its credentials"
            assert (secret_ref(user), secret_ref(password)) == login, f"{name}: not the server's secret"
            host = env["MLFLOW_TRACKING_URI"]["value"].removeprefix("http://")
            assert is_allowed_host_header(allowed_hosts, host), f"the server answers 403 to Host {host}"
    assert clients >= 3, "the Ray head and both worker groups track to MLflow"


def test_network_policies_select_the_pods_the_manifests_make():
    docs = load_all()
    policies = by_kind(docs, "NetworkPolicy")
    pods = pod_templates(docs)
    cluster = by_kind(docs, "RayCluster")["subjectforge"]
    ray_pods = {"subjectforge/head"} | {f"subjectforge/{g['groupName']}" for g in cluster["spec"]["workerGroupSpecs"]}
    submitters = {name for name, _, _ in pods if name.endswith("/submitter")}
    assert len(submitters) == 2 and ray_pods < {name for name, _, _ in pods}
    head_ports = {p["name"]: p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {"gcs": 6379, "client": 10001, "dashboard": 8265}.items() <= head_ports.items()
    mlflow_port = mlflow_server(docs)[1]["ports"][0]["containerPort"]

    expected = {  # policy -> (pods it guards, {pod: ports it may reach there}; other pods: none)
        "mlflow": ({"deployment/mlflow"}, dict.fromkeys(ray_pods, {mlflow_port})),
        "subjectforge-ray": (ray_pods, {**dict.fromkeys(ray_pods, ALL_PORTS), **dict.fromkeys(submitters, {8265})}),
        # The RayService's pods alone, for the ingress controller (tests/test_serve_infra.py): none of these.
        "subjectforge-serve-ingress": (set(), {}),
    }
    assert set(policies) == set(expected)
    for policy_name, (guarded, reach) in expected.items():
        policy = policies[policy_name]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert {name for name, labels, _ in pods if selects(policy["spec"]["podSelector"], labels)} == guarded
        for name, labels, _ in pods:
            assert reachable_ports(policy, labels) == frozenset(reach.get(name, ())), f"{policy_name}: {name}"
    # Peers in other namespaces: only the KubeRay operator, on the dashboard's port, and the
    # ingress controller, on Serve's.
    other_namespaces = {"kuberay-operator": [{"port": head_ports["dashboard"]}], "ingress-nginx": [{"port": 8000}]}
    for policy in policies.values():
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                if "namespaceSelector" in peer:
                    [name] = peer["podSelector"]["matchLabels"].values()
                    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": name}}
                    assert rule["ports"] == other_namespaces[name]


def test_no_secret_is_written_in_a_manifest():
    from pipeline.jobs import looks_secret

    docs = load_all()
    assert "Secret" not in {d["kind"] for d in docs}, "secrets are created with kubectl, not committed"
    for name, _, spec in pod_templates(docs):
        for container in spec["containers"]:
            for entry in container.get("env", []):
                if looks_secret(entry["name"]):
                    assert "value" not in entry and secret_ref(entry), f"{name}: {entry['name']} in plain text"
    for config_map in by_kind(docs, "ConfigMap").values():  # its RayJob templates are pods above
        for key, text in config_map["data"].items():
            if not key.endswith((".yaml", ".yml")):
                assert not re.search(r"(?i)\b(password|passwd|secret|token)\s*[=:]\s*\S", text)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a folder above it
    decides; `**` spans any number of folders, other parts match one name each."""

    def match(parts: list[str], names: list[str]) -> bool:
        if not parts:
            return not names
        if parts[0] == "**":
            return any(match(parts[1:], names[i:]) for i in range(len(names) + 1))
        return bool(names) and fnmatch.fnmatchcase(names[0], parts[0]) and match(parts[1:], names[1:])

    ignored = False
    names = path.split("/")
    for pattern in patterns:
        negated = pattern.startswith("!")
        parts = pattern.removeprefix("!").strip("/").split("/")
        if any(match(parts, names[:i]) for i in range(1, len(names) + 1)):
            ignored = not negated
    return ignored


def test_the_image_gets_only_the_allowed_files():
    from pipeline.jobs import UPLOAD_PATHS
    from tests.test_jobs import ALLOWED, KEPT_HOME

    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in KEPT_HOME:
        if path != "README.md":  # pip reads it: pyproject.toml names it as the readme
            assert dockerignored(path, patterns), f"{path} would be copied into the image"
    for path in [*ALLOWED, "README.md", "pipeline/configs/cluster-data.yaml", "datasets/dreambench/subjects.csv"]:
        assert not dockerignored(path, patterns), f"{path} is left out of the image"
    # The Dockerfile copies the allowed paths by name (never `.`), and they are what submit uploads.
    copied = set()
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        words = [w for w in line.split() if not w.startswith("--")]
        if words and words[0] == "COPY":
            copied |= set(words[1:-1])
    assert copied == {*UPLOAD_PATHS, "README.md"}


def test_the_manifests_auth_config_refuses_anonymous_writes(tmp_path):
    """A real `mlflow server --app-name basic-auth` on loopback with the ConfigMap's auth file
    (its user store moved to tmp_path): a write without a login is 401, with the admin's it works."""
    docs = load_all()
    ini = by_kind(docs, "ConfigMap")["mlflow-auth-config"]["data"]["basic_auth.ini"]
    ini = re.sub(r"database_uri = .*", f"database_uri = sqlite:///{tmp_path}/basic_auth.db", ini)
    (tmp_path / "basic_auth.ini").write_text(ini)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "subjectforge", "MLFLOW_AUTH_ADMIN_PASSWORD": "test-password-" + os.urandom(6).hex(),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
        # No job runners: the server would start ~7 Huey consumer processes this test never uses.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
           "--artifacts-destination", str(tmp_path / "artifacts")]
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.5)

        def create_experiment(name: str, login: tuple[str, str] | None) -> int:
            headers = {"Content-Type": "application/json"}
            if login:
                headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
            request = urllib.request.Request(base + "/api/2.0/mlflow/experiments/create",
                                             data=json.dumps({"name": name}).encode(), headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
        assert create_experiment("anonymous", None) == 401
        assert create_experiment("wrong", (admin[0], "not-the-password")) == 401
        assert create_experiment("admin", admin) == 200
    finally:
        stop_process_group(proc)

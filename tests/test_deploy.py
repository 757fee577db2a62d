"""deploy/: the compose file, the Kubernetes manifests (schema-validated offline), the Dockerfile
and the Grafana dashboard agree with the code they deploy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ops.metrics import SERIES
from settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SETTINGS = {name.upper() for name in Settings.model_fields}
K8S_VERSION = "1.33.0"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def k8s_documents() -> dict[str, dict]:
    """By kind for the worker's objects (and the Kustomization), by kind/name for the others."""
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            name = doc.get("metadata", {}).get("name")
            docs[doc["kind"] if name in (None, "bouncer-worker") else f"{doc['kind']}/{name}"] = doc
    return docs


def test_compose_runs_postgres_temporal_its_ui_and_workers_with_health_checks():
    services = compose()["services"]
    assert {"postgres", "temporal", "temporal-ui", "temporal-search-attributes", "worker"} <= set(services)
    worker = services["worker"]
    assert worker["command"] == ["python", "worker.py"]
    assert (DEPLOY / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert "replicas" in worker["deploy"]
    for name in ("postgres", "temporal", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "/readyz" in " ".join(worker["healthcheck"]["test"])
    assert services["temporal"]["environment"]["DB"] == "postgres12"  # Temporal on Postgres
    assert services["temporal"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert worker["depends_on"]["temporal-search-attributes"]["condition"] == "service_completed_successfully"
    assert services["temporal-ui"]["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"
    # The worker is stopped only after its drain time.
    grace = float(worker["environment"]["SHUTDOWN_GRACE_S"])
    assert int(worker["stop_grace_period"].rstrip("s")) > grace
    # The search attributes the workflows set are the ones the one-shot service creates.
    created = " ".join(services["temporal-search-attributes"]["command"])
    for key in ("UserId", "Lane", "BatchState", "Priority"):
        assert key in created
    # The sandbox runs from the worker image but serves no /readyz: the image's check is off there.
    assert services["sandbox"]["healthcheck"] == {"disable": True}


def test_compose_temporal_gives_every_api_queue_one_partition():
    """The API budgets are task-queue rate limits, divided among a queue's partitions."""
    services = compose()["services"]
    temporal, env = services["temporal"], services["worker"]["environment"]
    mounted = {v.split(":")[1]: (DEPLOY / v.split(":")[0]).resolve() for v in temporal["volumes"]}
    config = yaml.safe_load(mounted["/etc/temporal/" + temporal["environment"]["DYNAMIC_CONFIG_FILE_PATH"]].read_text())
    api_queues = {env[k] for k in ("API_CREATE_TASK_QUEUE", "API_TASK_QUEUE", "CATCHALL_API_CREATE_TASK_QUEUE",
                                   "CATCHALL_API_TASK_QUEUE")}
    for key in ("matching.numTaskqueueReadPartitions", "matching.numTaskqueueWritePartitions"):
        assert {c["constraints"]["taskQueueName"] for c in config[key] if c["value"] == 1} == api_queues, key
    assert config["system.enableEagerWorkflowStart"] == [{"value": True}]


def test_a_wildcard_callback_listen_without_a_public_url_gives_bouncer_no_callback():
    """0.0.0.0:8298 (compose, k8s, the image) is no address Bouncer can call: polling only, unless
    CALLBACK_PUBLIC_URL names one."""
    def base(listen: str, public: str = "") -> str:
        return Settings(database_url="postgresql://x", bouncer_api_key="k", callback_listen=listen,
                        callback_public_url=public, _env_file=None).callback_base_url

    assert base("0.0.0.0:8298") == base("[::]:8298") == base(":8298") == base("") == ""
    assert base("0.0.0.0:8298", "https://hooks.example.com/") == "https://hooks.example.com"
    assert base("10.0.0.5:8298") == "http://10.0.0.5:8298"


def test_compose_worker_environment_names_every_setting_and_nothing_else():
    env = set(compose()["services"]["worker"]["environment"])
    assert not env - SETTINGS, f"not settings (typos?): {sorted(env - SETTINGS)}"
    assert not SETTINGS - env, f"settings missing from deploy/compose.yaml: {sorted(SETTINGS - env)}"


def compose_command() -> list[str] | None:
    """`docker compose` (the plugin) or `docker-compose`, where Docker is installed."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(compose_command() is None, reason="docker compose is not installed here")
def test_docker_compose_accepts_the_file():
    run = subprocess.run([*compose_command(), "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    docs = k8s_documents()
    kinds = {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert kinds <= set(docs)
    for kind, doc in docs.items():
        if kind == "Kustomization":
            continue  # a kustomize file, not an API object
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    listed = set(docs["Kustomization"]["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def test_a_broken_manifest_is_refused_by_the_validator():
    deployment = k8s_documents()["Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "sixty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_k8s_worker_drains_before_it_is_killed_and_is_probed_on_its_metrics_port():
    docs = k8s_documents()
    config = docs["ConfigMap"]["data"]
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= float(config["SHUTDOWN_GRACE_S"]) + 10
    (container,) = pod["containers"]
    assert container["command"] == ["python", "worker.py"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(config["METRICS_LISTEN"].rsplit(":", 1)[1])
    assert ports["callbacks"] == int(config["CALLBACK_LISTEN"].rsplit(":", 1)[1])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"requests", "limits"} <= set(container["resources"])
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert "replicas" not in docs["Deployment"]["spec"]  # the HPA owns the count; a fixed one resets it on apply


def test_the_http_api_is_deployed_with_the_workers_settings_and_probed_on_its_port():
    docs, services = k8s_documents(), compose()["services"]
    config = docs["ConfigMap"]["data"]
    api_port = int(config["API_LISTEN"].rsplit(":", 1)[1])
    pod = docs["Deployment/bouncer-api"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "api"]
    assert container["envFrom"] == docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": api_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["livenessProbe"]["tcpSocket"] == {"port": "http"}  # an outage elsewhere must not restart it
    assert docs["Service/bouncer-api"]["spec"]["selector"] == docs["Deployment/bouncer-api"]["spec"]["selector"][
        "matchLabels"]
    api = services["api"]
    assert api["command"] == ["python", "-m", "api"] and api["environment"] == services["worker"]["environment"]
    assert api["depends_on"]["worker"]["condition"] == "service_healthy"  # the workers migrate
    assert f"127.0.0.1:{int(api['environment']['API_LISTEN'].rsplit(':', 1)[1])}/healthz" in " ".join(
        api["healthcheck"]["test"])


def test_k8s_config_and_secret_hold_every_setting_once():
    docs = k8s_documents()
    config, secret = set(docs["ConfigMap"]["data"]), set(docs["Secret"]["stringData"])
    assert not config & secret
    assert {"DATABASE_URL", "BOUNCER_API_KEY"} <= secret  # secrets stay out of the ConfigMap
    both = config | secret
    assert not both - SETTINGS, f"not settings: {sorted(both - SETTINGS)}"
    assert not SETTINGS - both, f"settings missing from deploy/k8s: {sorted(SETTINGS - both)}"


def test_dockerfile_is_multi_stage_and_runs_the_worker_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.MULTILINE | re.IGNORECASE)
    assert len(stages) >= 2
    runtime = text[text.rindex("\nFROM "):]
    user = re.findall(r"^USER\s+(\S+)", runtime, flags=re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    assert "COPY --from=build" in runtime
    assert re.search(r'^CMD \["python", "worker.py"\]', runtime, flags=re.MULTILINE)


def test_grafana_dashboard_queries_only_series_the_worker_exports():
    dash = json.loads((DEPLOY / "grafana" / "bouncer-pipeline.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = set(re.findall(r"\b((?:pipeline|bouncer|temporal)_[a-z_]+)", " ".join(exprs)))
    ours = {re.sub(r"_(bucket|count|sum)$", "", n) for n in names if not n.startswith("temporal_")}
    assert not ours - set(SERIES), f"unknown series in the dashboard: {sorted(ours - set(SERIES))}"
    # Every series we export has a panel.
    assert set(SERIES) <= ours | {"pipeline_rate_limit_budget_per_minute"}
    assert any(n.startswith("temporal_") for n in names)  # and the SDK's own

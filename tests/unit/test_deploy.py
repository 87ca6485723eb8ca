"""deploy/: the KubeRay manifests against KubeRay v1.7.0's CRD schemas, their embedded Serve config against
serve/config.yaml, the image's pins against pyproject.toml, cluster.yaml and the on-prem launcher config through
Ray's own validator, and every series the Prometheus rules and the Grafana dashboard name against the `raysys_*`
metrics the code defines (names and tag keys). No Ray cluster, no network."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from helpers.observability import PROM, _check_expr, alert_rules, defined_metrics, panel_queries

KUBERAY = REPO / "deploy" / "kuberay"
MANIFESTS = ("rayservice.yaml", "rayjob.yaml")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def _pins() -> dict[str, str]:
    """pyproject's `name==version` dependencies, by name (extras dropped)."""
    out = {}
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", dep.strip())
        if m:
            out[m.group(1).lower()] = m.group(3)
    return out


def _image_tag() -> str:
    m = re.search(r"^IMAGE \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "Makefile names the image (IMAGE ?= ...)"
    return m.group(1)


# ----- KubeRay -----


def _crd_dir() -> Path | None:
    """RAYSYS_KUBERAY_CRDS, else ../shared/kuberay beside the repository, else /work/shared/kuberay."""
    for cand in (os.environ.get("RAYSYS_KUBERAY_CRDS"), REPO.parent / "shared" / "kuberay", "/work/shared/kuberay"):
        if cand and (Path(cand) / "ray.io_rayservices.yaml").is_file():
            return Path(cand)
    return None


def _strict(schema):
    """Kubernetes refuses unknown fields (kubectl's strict field validation): close every object schema that
    lists its properties, unless it keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _spec_validator(kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    crds = _crd_dir()
    if crds is None:
        pytest.skip("KubeRay CRDs not found (set RAYSYS_KUBERAY_CRDS to a folder with ray.io_*.yaml)")
    crd = yaml.safe_load((crds / f"ray.io_{kind.lower()}s.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    spec_schema = _strict(v1["schema"]["openAPIV3Schema"]["properties"]["spec"])
    return jsonschema.Draft7Validator(spec_schema)


def _manifest(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((KUBERAY / name).read_text()))
    return doc


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]["rayClusterSpec"]


def _groups(doc: dict) -> list[tuple[str, dict]]:
    spec = _cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_spec_validates_against_the_kuberay_crd(name):
    doc = _manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    validator = _spec_validator(doc["kind"])
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc["spec"])]
    assert not errors, errors
    # the check bites: an unknown field and a wrong enum value are refused
    broken = copy.deepcopy(doc["spec"])
    _cluster_spec({"kind": doc["kind"], "spec": broken})["authOptions"] = {"mode": "tokens", "sekretName": "x"}
    assert len(list(validator.iter_errors(broken))) >= 2


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_cluster_settings(name):
    """What KubeRay's own validation (ray-operator/controllers/ray/utils/validation.go) and raysys need."""
    doc = _manifest(name)
    spec = _cluster_spec(doc)
    assert spec["authOptions"] == {"mode": "token"}
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)  # token auth needs Ray >= 2.52
    assert spec["rayVersion"] == _pins()["ray"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the operator reads it
    image = _image_tag()
    for group, g in _groups(doc):
        params = g["rayStartParams"]
        assert params.get("metrics-export-port") == "8080", group
        assert not {"num-cpus", "num-gpus", "memory", "redis-password"} & set(params), group
        (c,) = g["template"]["spec"]["containers"]
        env = {e["name"] for e in c["env"]}
        # the operator sets these from authOptions / gcsFaultToleranceOptions; set by hand they conflict
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "REDIS_PASSWORD", "RAY_REDIS_ADDRESS"} & env, group
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == 8080, group
        res = c["resources"]
        assert set(res["requests"]) >= {"cpu", "memory"} and res["requests"] == res["limits"], group
        gpu = "nvidia.com/gpu" in res["limits"]
        assert c["image"] == (f"{image}-gpu" if gpu else image), group
    if doc["kind"] == "RayService":
        ft = spec["gcsFaultToleranceOptions"]
        assert ft["redisAddress"] and ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]
    else:
        entry = doc["spec"]["entrypoint"].split()
        assert entry[:2] == ["python", "/app/jobs/pipeline.py"] and (REPO / "jobs" / "pipeline.py").is_file()


def test_rayservice_workers_are_ready_through_readyz():
    doc = _manifest("rayservice.yaml")
    routes = (REPO / "serve" / "routes.py").read_text()
    assert '@app.get("/readyz")' in routes
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    port = serve_cfg["http_options"]["port"]
    for group, g in _groups(doc)[1:]:
        (c,) = g["template"]["spec"]["containers"]
        probe = " ".join(c["readinessProbe"]["exec"]["command"])
        assert f"http://localhost:{port}/readyz" in probe and "local_raylet_healthz" in probe, group


def test_rayservice_serve_config_is_serve_config_yaml():
    """serveConfigV2 = serve/config.yaml with the cluster's paths; both valid for Ray and for raysys."""
    from ray.serve.schema import ServeDeploySchema

    from raysys.config import MonitorConfig, ServeConfig

    embedded = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    expected = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    # the only differences allowed: the registry on the pods' shared volume, and the proxy reachable from the
    # Kubernetes Service (with HAProxy it binds all interfaces either way)
    expected["applications"][0]["args"]["registry_uri"] = "/mnt/raysys/registry"
    expected["http_options"]["host"] = "0.0.0.0"
    assert embedded == expected, "copy serve/config.yaml into deploy/kuberay/rayservice.yaml's serveConfigV2"
    ServeDeploySchema.model_validate(embedded) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(embedded)
    args = embedded["applications"][0]["args"]
    ServeConfig.model_validate(args["serve_cfg"])
    MonitorConfig.model_validate(args["monitor_cfg"])


# ----- image -----


def test_dockerfile_installs_what_pyproject_pins():
    text = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    pins = _pins()
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\S+)$", text, re.M).group(1)
    py = "py" + PYPROJECT["project"]["requires-python"].removeprefix(">=").replace(".", "")
    assert base == f"{pins['ray']}-{py}"
    install = " ".join(line for line in text.replace("\\\n", " ").splitlines() if "pip install" in line)
    in_image = {m.group(1).lower(): m.group(3)
                for m in re.finditer(r'"?([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([0-9][^"\s]*)"?', install)}
    assert in_image == pins, (in_image, pins)  # every pin, and nothing else pinned differently
    assert "ray[default,train,tune,serve,data]==" in install and install.rstrip().count(" /app") >= 1
    for pkg in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"COPY --chown=ray:users {pkg.rstrip('*')} /app/{pkg.rstrip('*')}" in text
    assert "COPY --chown=ray:users jobs /app/jobs" in text  # the RayJob's entrypoint
    makefile = (REPO / "Makefile").read_text()
    assert _image_tag() == f"ghcr.io/raysys/raysys:{VERSION}"
    assert f"--build-arg BASE_IMAGE=rayproject/ray:{pins['ray']}-{py}-gpu" in makefile
    assert "-t $(IMAGE)-gpu" in makefile


# ----- cluster launcher -----


@pytest.mark.parametrize("path", ["cluster.yaml", "deploy/launcher/cluster-onprem.yaml"])
def test_launcher_configs_pass_rays_validator(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / path).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    starts = config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd and "--metrics-export-port=8080" in cmd
        assert 'eval "$(~/venv/bin/raysys serve env)"' in cmd
    assert "--dashboard-host=127.0.0.1" in starts[0]  # reached with `ray dashboard <config>`
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):  # the validator bites: an unknown key
        validate_config(prepare_config({**copy.deepcopy(config), "max_wrokers": 3}))


def test_cluster_yaml_node_types():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and config["head_node_type"] == "head"
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert types["gpu_worker"]["min_workers"] == 0
    assert yaml.safe_load((REPO / "deploy/launcher/cluster-onprem.yaml").read_text())["provider"]["type"] == "local"


# ----- observability -----


def test_metric_definitions_are_parsed():
    metrics = defined_metrics()
    assert metrics["raysys_drift_psi"] == ("Gauge", frozenset({"feature"}))
    assert metrics["raysys_request_latency_ms"] == ("Histogram", frozenset({"model_version"}))
    assert metrics["raysys_request_latency_quantile_ms"][1] == {"model_version", "quantile"}
    assert {"raysys_train_samples_per_s", "raysys_train_rank_memory_bytes", "raysys_monitor_rows_dropped_total",
            "raysys_retrain_jobs_total"} <= set(metrics)


def test_alert_rules_name_defined_series_and_labels():
    metrics = defined_metrics()
    rules = alert_rules()
    assert {r["alert"] for r in rules} == {"RaysysDriftAlert", "RaysysAccuracyDrop", "RaysysLatencyP99OverBudget",
                                           "RaysysErrorRatio", "RaysysMonitorRowsDropped", "RaysysRetrainJobFailed"}
    for r in rules:
        templated = set(re.findall(r"\$labels\.(\w+)", json.dumps(r.get("annotations", {}))))
        _check_expr(r["expr"], metrics, templated)
    # the Kubernetes copy carries the same groups
    (op,) = list(yaml.safe_load_all((PROM / "prometheusrule.yaml").read_text()))
    assert op["kind"] == "PrometheusRule" and op["spec"] == yaml.safe_load((PROM / "raysys-rules.yml").read_text())


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_checks_rules_and_config():
    for args in (["check", "rules", str(PROM / "raysys-rules.yml")], ["check", "config", str(PROM / "prometheus.yml")]):
        run = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_dashboard_covers_every_raysys_metric():
    metrics = defined_metrics()
    dash = json.loads((REPO / "deploy" / "grafana" / "raysys.json").read_text())
    used: set[str] = set()
    for expr, legend in panel_queries():
        used |= _check_expr(expr, metrics, legend)
    assert used == set(metrics), f"metrics without a panel: {sorted(set(metrics) - used)}"
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource"]


def test_scrape_configs_match_the_clusters():
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert all((PROM / f).is_file() for f in prom["rule_files"])
    (sd,) = prom["scrape_configs"][0]["file_sd_configs"]
    assert sd["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]  # written by Ray on the head
    (pm,) = list(yaml.safe_load_all((PROM / "podmonitor.yaml").read_text()))
    assert pm["kind"] == "PodMonitor" and pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}

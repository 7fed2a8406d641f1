"""docker-compose.yml and deploy/ hang together: the compose file passes docker-compose's own schema
validation, and Prometheus, Grafana and the cpt containers point at each other correctly."""

import json
import os
import pathlib
import shutil
import tempfile
import subprocess

import pytest
import yaml

from test_hf_parity import ROOT

DEPLOY = ROOT / "deploy"


def compose_config(*args):
    """`docker-compose config` (Debian's docker-compose validates against the compose schema without a daemon)."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (scripts/test.sh installs Debian's package)")
    env = dict(os.environ, CPT_API_TOKEN="api-secret", CPT_WORKER_TOKEN="worker-secret")
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), *args, "config"],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def mounts(service):
    """target → source of a service's volumes (docker-compose 1.x prints the short `source:target:mode`)."""
    pairs = (v.split(":")[:2] if isinstance(v, str) else (v["source"], v["target"]) for v in service["volumes"])
    return {target: source for source, target in pairs}


def test_compose_file_is_valid_and_the_gpu_worker_is_opt_in():
    config = compose_config("--profile", "gpu")
    assert set(config["services"]) == {"server", "gpu-worker", "prometheus", "grafana"}
    # docker-compose 1.29's `config` prints every profile; `up` starts gpu-worker only with --profile gpu.
    assert [name for name, s in config["services"].items() if s.get("profiles")] == ["gpu-worker"]
    worker = config["services"]["gpu-worker"]
    assert worker["profiles"] == ["gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["build"]["dockerfile"].endswith("Dockerfile.cuda")
    assert "--features cuda" in (DEPLOY / "Dockerfile.cuda").read_text()
    # Workers reach the server by its service name, with the worker token, and share its data volume.
    assert "http://server:8080" in worker["command"]
    assert worker["environment"]["CPT_WORKER_TOKEN"] == "worker-secret"
    server = config["services"]["server"]
    assert mounts(worker)["/data"] == mounts(server)["/data"] == "cpt-data"


def test_compose_refuses_to_start_without_tokens():
    # Bound beyond loopback inside the container, the server needs both tokens: compose says so first.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPT_")}
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
                            env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "CPT_" in result.stderr


def test_prometheus_scrapes_the_server_and_grafana_reads_prometheus():
    config = compose_config()
    server_port = config["services"]["server"]["command"][config["services"]["server"]["command"].index("--bind") + 1]
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == ["server:" + server_port.rsplit(":", 1)[1]]
    if shutil.which("promtool"):
        # The token file is written at deploy time beside the config (see docker-compose.yml).
        with tempfile.TemporaryDirectory() as directory:
            shutil.copy(DEPLOY / "prometheus/prometheus.yml", directory)
            pathlib.Path(directory, "cpt-api-token").write_text("token")
            check = subprocess.run(["promtool", "check", "config", str(pathlib.Path(directory, "prometheus.yml"))],
                                   capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/cpt.yml").read_text())["providers"][0]
    grafana = config["services"]["grafana"]
    dashboards_dir = mounts(grafana)[provider["options"]["path"]]
    assert os.path.samefile(dashboards_dir, DEPLOY / "grafana/dashboards")
    dashboard = json.loads((DEPLOY / "grafana/dashboards/cpt.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {datasource["uid"]}, "every panel reads the provisioned datasource"

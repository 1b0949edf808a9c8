"""docker-compose.yml, deployments/prefect.yaml and deployments/Dockerfile, checked for structure:
services, pinned images, ports on 127.0.0.1, healthchecks, volumes, dependencies, and that the
environment they hand the pipeline is the one its config reads. (No Docker on this machine.)"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from foresight_core.config import load_config
from foresight_core.config.load import ENV_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict = COMPOSE["services"]
PREFECT_YAML = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
# services that run pipeline code, and so need to know where tracking, the cluster and storage are
PIPELINE_SERVICES = ("prefect-worker", "ray-head", "ray-worker")


def _one_shot(svc: dict) -> bool:
    return svc.get("restart") == "no"


def test_services() -> None:
    assert set(SERVICES) == {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-deploy",
                             "ray-head", "ray-worker", "prefect-worker"}


def test_secrets_are_guarded_and_documented() -> None:
    """Every secret comes from .env through a ${VAR:?} guard (no silent default), and .env.example lists it."""
    text = (ROOT / "docker-compose.yml").read_text()
    example = (ROOT / ".env.example").read_text()
    for var in ("FORESIGHT_DB_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "FORESIGHT_S3_ACCESS_KEY",
                "FORESIGHT_S3_SECRET_KEY"):
        assert f"${{{var}:?" in text and f"${{{var}:-" not in text, var
        assert f"\n{var}=" in example, var
    # the pipeline's services use the least-privilege S3 user, never MinIO's root
    for name in PIPELINE_SERVICES + ("mlflow",):
        env = SERVICES[name]["environment"]
        assert "FORESIGHT_S3_ACCESS_KEY" in str(env["AWS_ACCESS_KEY_ID"]) and "MINIO_ROOT" not in str(env), name
    # no password on a command line
    for name, svc in SERVICES.items():
        assert "PASSWORD" not in " ".join(map(str, svc.get("command", []))), name


@pytest.mark.parametrize("name", PIPELINE_SERVICES)
def test_services_that_run_tool_code_get_the_sandbox_exemptions_and_no_capability(name: str) -> None:
    svc = SERVICES[name]
    assert set(svc["security_opt"]) == {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"}
    assert "cap_add" not in svc and not svc.get("privileged")


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_image_pinned_or_built(name: str) -> None:
    svc = SERVICES[name]
    image = svc["image"]
    if "build" in svc:  # our own image, built from this repository
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    else:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_ports_bound_to_loopback(name: str) -> None:
    for port in SERVICES[name].get("ports", []):
        assert re.fullmatch(r"127\.0\.0\.1:\d+:\d+", str(port)), f"{name}: {port} is not bound to 127.0.0.1"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_healthchecks(name: str) -> None:
    svc = SERVICES[name]
    if _one_shot(svc):
        assert "healthcheck" not in svc
        return
    check = svc["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) >= 2
    assert re.fullmatch(r"\d+s", check["interval"]) and check["retries"] >= 3
    assert svc["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_dependencies_and_volumes(name: str) -> None:
    svc = SERVICES[name]
    for dep, cond in (svc.get("depends_on") or {}).items():
        assert dep in SERVICES, f"{name} depends on unknown service {dep}"
        if cond["condition"] == "service_healthy":
            assert "healthcheck" in SERVICES[dep]
        else:
            assert cond["condition"] == "service_completed_successfully" and _one_shot(SERVICES[dep])
    for vol in svc.get("volumes", []):
        source = vol.split(":")[0]
        if source.startswith("."):
            assert (ROOT / source).exists(), f"{name}: bind mount {source} missing"
        else:
            assert source in COMPOSE["volumes"], f"{name}: volume {source} not declared"


def test_no_dependency_cycle() -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle {' -> '.join(path + (name,))}"
        for dep in SERVICES[name].get("depends_on") or {}:
            visit(dep, path + (name,))
        done.add(name)

    for name in SERVICES:
        visit(name, ())
    assert done == set(SERVICES)


@pytest.mark.parametrize("name", PIPELINE_SERVICES)
def test_pipeline_environment_points_at_the_services(name: str) -> None:
    env = SERVICES[name]["environment"]
    # every variable handed over is one the config reads (or a setting of Prefect / Ray itself)
    for var in env:
        assert var in ENV_OVERRIDES or var.startswith(("PREFECT_", "RAY_")), var
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_URL", "FORESIGHT_WORK_DIR", "AWS_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[var], var
    # URLs name services of this file, on ports those services listen on
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_URL", "AWS_ENDPOINT_URL"):
        url = urlparse(env[var])
        assert url.hostname in SERVICES, f"{var}={env[var]}"
        assert str(url.port) in " ".join(map(str, SERVICES[url.hostname]["command"])) + str(
            SERVICES[url.hostname].get("ports", [])), f"{var}: {url.hostname} does not listen on {url.port}"
    cfg = load_config("laptop", env={k: str(v) for k, v in env.items()})
    assert cfg.work_dir.startswith("s3://") and cfg.infra.ray.address == env["RAY_ADDRESS"]


def test_worker_pool_matches_prefect_yaml() -> None:
    command = SERVICES["prefect-worker"]["command"]
    pool = command[command.index("--pool") + 1]
    assert {d["work_pool"]["name"] for d in PREFECT_YAML["deployments"]} == {pool}


def test_dockerfile_copies_what_exists() -> None:
    text = (ROOT / "deployments" / "Dockerfile").read_text()
    copied = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert copied
    for sources in copied:
        for src in sources:
            assert (ROOT / src).exists(), src


@pytest.mark.parametrize("deployment", PREFECT_YAML["deployments"], ids=lambda d: d["name"])
def test_prefect_yaml_deployments(deployment: dict) -> None:
    from prefect import Flow
    from prefect.schedules import Cron

    path, func = deployment["entrypoint"].split(":")
    assert (ROOT / path).is_file()
    module = importlib.import_module("flows." + Path(path).stem)
    assert isinstance(getattr(module, func), Flow)
    from flows.pipeline import flow_config

    # a preset and (empty) overrides, never a whole config: a run's own overrides cannot drop the preset
    assert deployment["parameters"] == {"preset": "laptop", "overrides": {}}
    cfg = flow_config(**deployment["parameters"], environ={"FORESIGHT_WORK_DIR": "s3://foresight/work"})
    assert cfg.model_dump(exclude={"work_dir"}) == load_config("laptop", env={}).model_dump(exclude={"work_dir"})
    assert cfg.work_dir == "s3://foresight/work"  # the worker's environment gives the infrastructure
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    for sched in deployment.get("schedules", []):
        Cron(sched["cron"], timezone=sched["timezone"])

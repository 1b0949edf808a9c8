"""Where the pipeline runs: process environment, Ray (local or a cluster) and Ray Data maps.

    from tasks.runtime import setup_env, init_ray, ray_map
    setup_env(cfg)                    # BEFORE prefect is imported: PREFECT_HOME, server URL, telemetry off
    init_ray(cfg.infra.ray)           # local Ray on 127.0.0.1 with a capped object store, or RAY_ADDRESS
    rows = ray_map(items, fn, num_blocks=8)   # fn(list[item]) -> list[row], run as a Ray Data job

The embedded default needs nothing started by hand: Prefect's ephemeral server with its
database under the work dir, a local Ray bound to 127.0.0.1 with no dashboard, MLflow on a
sqlite file (``tasks.tracking``). Config (or the standard environment variables
``RAY_ADDRESS``, ``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``, ``AWS_*``) points the same code at
servers. Settings a user already exported always win over the defaults set here.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from foresight_core.config import PipelineConfig, RayConfig
from foresight_core.storage import WorkDir


# A local Ray on 127.0.0.1 only. Ray turns a node address of 127.0.0.1 into this machine's external
# one unless it runs single-node (its macOS / Windows mode), where every Ray server binds to
# 127.0.0.1; Ray reads the switch when it is imported. Loopback needs no token (a cluster keeps
# whatever auth it was given).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def setup_env(cfg: PipelineConfig, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the process environment the orchestration layer reads; returns what it set.

    Prefect reads its settings when it is imported, so call this first. Only variables that
    are unset get a default, except ``PREFECT_API_URL``, which the config (already resolved
    with its environment override) decides.
    """
    defaults: dict[str, str] = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the ephemeral server starts in ~7 s on an idle 2-core machine; give a loaded one room
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    if cfg.infra.prefect.api_url:
        environ["PREFECT_API_URL"] = cfg.infra.prefect.api_url
    elif WorkDir(cfg.work_dir).is_local:
        # the ephemeral server's database lives with the rest of this config's outputs
        defaults["PREFECT_HOME"] = str(WorkDir(cfg.work_dir).prefect_home)
    if not cfg.infra.ray.address:
        defaults.update(LOCAL_RAY_ENV)
    defaults.update(mlflow_client_env(cfg))
    set_now = {k: v for k, v in defaults.items() if not environ.get(k)}
    environ.update(set_now)
    if "PREFECT_HOME" in set_now:
        Path(set_now["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect makes only the last level
    if cfg.infra.prefect.api_url:
        set_now["PREFECT_API_URL"] = cfg.infra.prefect.api_url
    return set_now


def mlflow_client_env(cfg: PipelineConfig) -> dict[str, str]:
    """How MLflow's clients retry (``infra.tracking.http_retries``), as the environment MLflow reads."""
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(cfg.infra.tracking.http_retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def init_ray(ray_cfg: RayConfig, env_vars: dict[str, str] | None = None) -> str:
    """Connect to the configured Ray cluster, or start a local Ray bound to 127.0.0.1.

    Returns the address in use ("local" for a local Ray). A Ray already initialised in this
    process (a test fixture, a notebook) is used as it is. ``env_vars`` reach every Ray worker of this
    driver (its runtime environment).
    """
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
    if not ray_cfg.address:
        for k, v in LOCAL_RAY_ENV.items():
            os.environ.setdefault(k, v)  # before Ray is imported (see LOCAL_RAY_ENV)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    with _RAY_INIT:  # rows side by side (``foresight ablate`` lanes) may start their first stages at once
        return _init_ray(ray, ray_cfg, runtime_env)


_RAY_INIT = threading.Lock()


def _init_ray(ray: Any, ray_cfg: RayConfig, runtime_env: dict[str, Any] | None) -> str:
    if ray.is_initialized():
        return "existing"
    from tasks.progress import activity

    if ray_cfg.address:
        # a cluster: its workers must have this package installed (deployments/Dockerfile does that)
        with activity("ray", f"connecting to {ray_cfg.address}"):
            ray.init(address=ray_cfg.address, log_to_driver=False, configure_logging=False, runtime_env=runtime_env)
        return ray_cfg.address
    with activity("ray", "starting a local Ray"):
        ray.init(
            address="local",  # a new Ray of our own, never a cluster that `ray start` left on this machine
            num_cpus=ray_cfg.num_cpus,
            object_store_memory=ray_cfg.object_store_memory_mb * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env=runtime_env,
        )
    return "local"


def ray_map(items: list[dict[str, Any]], fn: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
            num_blocks: int, progress: bool = True, description: str = "collect") -> list[dict[str, Any]]:
    """``fn`` over ``items`` as a Ray Data job; the rows come back in the items' order.

    Items are split into ``num_blocks`` blocks and each block is one ``map_batches`` call
    (``batch_size=None``), so ``fn`` sees whole blocks and parallelism equals the block count.
    Rows are nested dicts of any shape, which Arrow cannot always type (lists that are empty
    in one row and hold dicts in the next, ``meta`` that differs by environment), so items and
    rows cross Ray Data as JSON text: one output row per block, holding its rows as one JSON
    list and the index of its first item (Ray Data does not keep order by default, the index does).
    """
    import ray.data

    if not items:
        return []
    encoded = [{"index": i, "item": json.dumps(it)} for i, it in enumerate(items)]

    def run_block(batch: dict[str, Any]) -> dict[str, list[Any]]:
        block_items = [json.loads(s) for s in batch["item"]]
        return {"start": [int(batch["index"][0])], "n_items": [len(block_items)],
                "rows": [json.dumps(fn(block_items))]}

    blocks: list[tuple[int, list[dict[str, Any]]]] = []
    with quiet_ray_data():  # the bar below shows progress in items
        ds = ray.data.from_items(encoded, override_num_blocks=min(num_blocks, len(items)))
        ds = ds.map_batches(run_block, batch_format="numpy", batch_size=None)
        with _progress(progress, description, total=len(items)) as advance:
            for out in ds.iter_rows():
                blocks.append((int(out["start"]), json.loads(out["rows"])))
                advance(int(out["n_items"]))
    return [row for _, rows in sorted(blocks, key=lambda b: b[0]) for row in rows]


@contextmanager
def quiet_ray_data() -> Iterator[None]:
    """Ray Data without its own progress bars and per-dataset log lines, for datasets created inside:
    the caller shows progress in its own units (``tasks.progress``)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # "progress bars disabled" and per-dataset chatter
    try:
        yield
    finally:
        data_log.setLevel(level)


@contextmanager
def _progress(show: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress line counted in items (or nothing): ``with _progress(...) as advance``; a bar on a
    terminal, plain lines elsewhere (``tasks.progress.Display``)."""
    if not show:
        yield lambda n: None
        return
    from tasks.progress import Display, Status, clock

    display, done = Display(description), 0
    display.show(Status(phase="collect", done=0, total=total, unit="items"))

    def advance(n: int) -> None:
        nonlocal done
        done += n
        elapsed = display.elapsed()
        display.show(Status(phase="collect", done=done, total=total, unit="items",
                            eta_s=elapsed * (total - done) / done if 0 < done < total else None))

    ok = False
    try:
        yield advance
        ok = True
    finally:
        display.close(f"[{display.name} {clock(display.elapsed())}] {'done' if ok else 'failed'}: "
                      f"{done}/{total} items")


# ---------------------------------------------------------------------------------------------
# CPUs per worker: a stage uses the machine unless told otherwise


def node_tags(prefix: str = "foresight.worker") -> dict[str, str]:
    """Which Ray node this process runs on, as MLflow tags (called inside a Ray worker or actor)."""
    import socket

    import ray

    node_id = ray.get_runtime_context().get_node_id()
    ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), "")  # the address Ray uses
    return {f"{prefix}.node_id": node_id, f"{prefix}.node_ip": ip, f"{prefix}.hostname": socket.gethostname()}


def cpus_per_worker(num_workers: int, node_cpus: list[int], explicit: int | None = None) -> int:
    """CPUs (and torch threads) for each of ``num_workers`` workers on nodes with ``node_cpus`` CPUs.

    ``explicit`` wins. Otherwise the largest c such that the nodes hold every worker with c CPUs each
    (sum over nodes of floor(cpus / c) >= num_workers): one worker on a 2-CPU laptop gets 2, two get 1
    each; four workers on two 8-CPU nodes get 4 each. At least 1 (Ray then queues what does not fit).
    """
    if explicit is not None:
        return explicit
    best = 1
    for c in range(1, max(node_cpus, default=1) + 1):
        if sum(n // c for n in node_cpus) >= num_workers:
            best = c
    return best


def node_cpus() -> list[int]:
    """The CPU count of every alive Ray node that offers CPUs (Ray must be initialised)."""
    import ray

    return [int(n["Resources"]["CPU"]) for n in ray.nodes()
            if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]


def worker_threads(cfg: PipelineConfig, num_workers: int, explicit: int | None) -> tuple[int, int]:
    """``(cpus reserved per worker, torch threads per worker)`` for a stage on the Ray that is running:
    ``cfg.num_threads`` sets the threads alone, ``explicit`` (a stage's ``scaling.cpus_per_worker``) both, and
    ``infra.ray.cpus_per_stage`` caps what the stage may take of each node."""
    share = cfg.infra.ray.cpus_per_stage  # rows side by side (``foresight ablate`` lanes): each stage its share
    cpus = cpus_per_worker(num_workers, [min(n, share) if share else n for n in node_cpus()], explicit)
    return cpus, cfg.num_threads or cpus

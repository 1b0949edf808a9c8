"""Shared fixtures: a hermetic environment, an isolated Prefect, MLflow on sqlite, a local Ray.

At import time (before any test imports Prefect, which reads its settings on import):
- the variables that point the pipeline at servers are removed, since ``load_config`` would
  apply them (``MLFLOW_TRACKING_URI``, ``RAY_ADDRESS``, ``PREFECT_API_URL``, ``AWS_*``); tests that
  need a server read ``FORESIGHT_TEST_*`` variables, set by ``.ci/run``, and skip without them;
- ``PREFECT_HOME`` becomes a fresh temporary folder, analytics and Ray usage stats are off, and a
  local Ray runs single-node, bound to 127.0.0.1 (``tasks.runtime.LOCAL_RAY_ENV``).

Fixtures:
- ``prefect_server`` (session): Prefect's test harness, a throw-away server and database.
- ``ray_local`` (session): a local Ray on 127.0.0.1, 2 CPUs, a 128 MiB object store.
- ``mlflow_uri``: ``sqlite:///<tmp_path>/mlflow.db``.
- ``tiny_cfg``: the ``tiny`` preset with its work dir and MLflow inside ``tmp_path``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.runtime import LOCAL_RAY_ENV

SERVER_VARS = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_URL", "PREFECT_API_KEY", "AWS_ENDPOINT_URL",
               "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
               "FORESIGHT_WORK_DIR")
for _var in SERVER_VARS:
    os.environ.pop(_var, None)
_PREFECT_HOME = tempfile.mkdtemp(prefix="foresight-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.update(LOCAL_RAY_ENV)  # before any test module imports Ray: a local Ray binds to 127.0.0.1 only
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

# Prefect binds its console log handler to the sys.stderr of the moment it is imported. Import it
# now, under the session's output capture, so that a test capturing output (capsys) that happens
# to import it first cannot leave it writing to a stream closed after that test.
try:
    import prefect.main  # noqa: F401  (prefect itself imports lazily; main sets up logging)
except ImportError:  # foresight_core's tests run without Prefect installed
    pass


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    from foresight_core.config import RayConfig
    from tasks.runtime import init_ray

    started = init_ray(RayConfig(num_cpus=2, object_store_memory_mb=128)) != "existing"
    yield
    if started:
        import ray

        ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def tiny_cfg(tmp_path: Path, mlflow_uri: str):
    from foresight_core.config import load_config

    return load_config("tiny", overrides=[f"work_dir={tmp_path / 'work'}",
                                          f"infra.tracking.tracking_uri={mlflow_uri}"], env={})

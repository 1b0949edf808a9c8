"""Where things run and where they are stored: tracking, Ray, Prefect, object storage.

Every field has an embedded default (local sqlite MLflow, a local Ray, Prefect's
ephemeral server, local files). Environment variables override the file
(``MLFLOW_TRACKING_URI``, ``RAY_ADDRESS``, ``PREFECT_API_URL``, ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``); see
``foresight_core.config.load.apply_env_overrides``.
"""

from __future__ import annotations

from pydantic import Field, SecretStr

from foresight_core.config.base import StrictModel


class TrackingConfig(StrictModel):
    tracking_uri: str | None = None
    """MLflow tracking URI. None: a sqlite file under the work dir (``sqlite:///<work_dir>/mlflow.db``)."""
    experiment: str = "foresight"
    """MLflow experiment that every run of the pipeline lands in."""
    sample_trajectories: int = Field(default=20, ge=0)
    """How many rendered trajectories to log as an artifact per stage."""
    http_retries: int = Field(default=5, ge=0, le=15)
    """Retries of an MLflow request that failed to connect, 1, 2, 4, ... s apart: a server restarting
    for a few seconds is ridden out; one that stays down fails the stage after about 2^retries seconds
    with an error naming it. In every process of a stage, its Ray workers included."""
    stage_lease_s: float = Field(default=90.0, ge=5, le=3600)
    """A running stage renews a lease on its MLflow run every third of this. Another run of the same
    stage (same key) waits while the lease is live, and resumes the stage once it has lapsed (the
    holder died): two runs never train into one MLflow run or one checkpoint folder at once."""


class RayConfig(StrictModel):
    address: str | None = None
    """Ray cluster address (``ray://host:10001`` or ``auto``). None: start a local Ray bound to 127.0.0.1."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs for a local Ray (None: all of this machine's)."""
    object_store_memory_mb: int = Field(default=512, ge=64)
    """Object store cap for a local Ray (Ray reserves ~30% of RAM by default)."""
    cpus_per_stage: int | None = Field(default=None, ge=1)
    """CPUs one stage may reserve on a node, split among its workers or actors (each gets as many torch threads).
    None: a whole node's. ``foresight ablate`` with ``lanes`` > 1 on a local Ray sets it to the Ray's CPUs / lanes,
    so that the rows in flight share the machine instead of oversubscribing it."""
    keep_finished_checkpoints: bool = False
    """Keep a training stage's Ray run folder (its checkpoints: weights and optimiser state, ~1.6 GB each
    for SmolLM2-135M in fp32) after the stage has finished and its model is in MLflow. False: deleted then,
    since a finished stage is reused by its key and never resumed; a stage that fails or is interrupted
    keeps its checkpoints to resume from either way. An ablation table at 3 seeds keeps ~100 GB otherwise."""


class PrefectConfig(StrictModel):
    api_url: str | None = None
    """Prefect server API URL. None: Prefect's ephemeral local server."""


class StorageConfig(StrictModel):
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto, ...). None: AWS's default endpoint."""
    key: SecretStr | None = None
    """S3 access key id (never logged)."""
    secret: SecretStr | None = None
    """S3 secret access key (never logged)."""
    region: str | None = None
    """S3 region."""

    def storage_options(self) -> dict:
        """fsspec/s3fs options for ``s3://`` URIs; empty fields are left to s3fs's own lookup."""
        opts: dict = {}
        if self.key is not None:
            opts["key"] = self.key.get_secret_value()
        if self.secret is not None:
            opts["secret"] = self.secret.get_secret_value()
        client_kwargs = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        return opts


class InfraConfig(StrictModel):
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking."""
    ray: RayConfig = RayConfig()
    """Ray cluster or local Ray."""
    prefect: PrefectConfig = PrefectConfig()
    """Prefect server or ephemeral server."""
    storage: StorageConfig = StorageConfig()
    """Object storage credentials for ``s3://`` work dirs."""

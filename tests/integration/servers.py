"""The operated stack as real processes on 127.0.0.1, in docker-compose.yml's topology:

    postgres          MLflow's backend store and Prefect's database (two databases, one password)
    moto (S3)         the foresight and mlflow buckets (docker-compose: MinIO)
    mlflow server     Postgres backend, artifacts proxied to s3://mlflow/artifacts
    prefect server    on its own Postgres database, with its scheduler
    ray head + node   two Ray nodes started by `ray start` (not by the flow), 1 CPU each
    prefect worker    a process worker on the deployments' pool, with the pipeline's environment

``start_stack`` starts them (the ``stack`` fixture of conftest.py calls it), and ``Stack.stop`` stops every process it started by
process id (its process group, and every child it had), whatever happened. Every server binds
127.0.0.1. The secrets (database password, S3 key) are random per run, so the security test can
search for them. Postgres refuses to run as root: as root, its processes run as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "foresight"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        import psutil

        try:
            me = psutil.Process(self.proc.pid)
            return [self.proc.pid, *(c.pid for c in me.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to its process group and every child it had (Ray daemons leave the group), then SIGKILL."""
        import psutil

        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace_s
            while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                                 for p in pids):
                time.sleep(0.2)
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                continue
            if not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids):
                return


@dataclass
class Stack:
    root: Path
    db_password: str
    s3_key: str
    s3_secret: str
    pg_port: int
    s3_url: str
    mlflow_url: str
    prefect_api: str
    ray_address: str
    ray_temp: Path
    pg_home: Path
    worker_env: dict[str, str]
    services: dict[str, Service] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that uses the stack (a `prefect deploy`, the worker)."""
        return {**self.worker_env, **extra}

    def service(self, name: str, argv: list[str], env: dict[str, str] | None = None, user: str | None = None,
                cwd: Path | None = None) -> Service:
        log = self.root / f"{name}.log"
        if user:
            argv = ["runuser", "-u", user, "--", *argv]
        proc = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env or os.environ.copy(),
                                cwd=cwd or self.root, start_new_session=True)
        svc = Service(name, proc, log, env, cwd or self.root)
        self.services[name] = svc
        return svc

    def stop(self) -> None:
        for name in reversed(list(self.services)):
            self.services[name].stop()

    def restart(self, name: str, down_s: float) -> None:
        """Stop a server, wait ``down_s``, start it again with the same command line, environment and port."""
        svc = self.services[name]
        argv, env, cwd = svc.proc.args, svc.env, svc.cwd
        svc.stop()
        time.sleep(down_s)
        again = self.service(name, list(argv), env=env, cwd=cwd)
        wait_for(lambda: http_ok(self.mlflow_url + "/health") if name == "mlflow" else True, again, "restart", 120)


def wait_for(check, svc: Service, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if svc.proc.poll() is not None:
            raise RuntimeError(f"{svc.name} exited ({svc.proc.returncode}) before {what}; its log:\n{svc.tail()}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 -- not up yet
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{svc.name}: no {what} after {timeout:.0f}s; its log:\n{svc.tail()}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status == 200


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _start_postgres(st: Stack) -> None:
    pg = pg_bin()
    as_root = os.geteuid() == 0
    home = st.pg_home
    data, sock = home / "data", home / "sock"
    sock.mkdir(parents=True)
    pwfile = home / "pw"
    pwfile.write_text(st.db_password + "\n")
    if as_root:  # pytest's folders are private to root: Postgres gets a folder of its own
        for p in (home, sock, pwfile):
            shutil.chown(p, "postgres")
    user = "postgres" if as_root else None
    init = ["runuser", "-u", "postgres", "--"] if as_root else []
    out = subprocess.run([*init, str(pg / "initdb"), "-D", str(data), "-U", "foresight", f"--pwfile={pwfile}",
                          "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"initdb failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    pwfile.unlink()
    svc = st.service("postgres", [str(pg / "postgres"), "-D", str(data), "-p", str(st.pg_port), "-k", str(sock),
                                  "-c", "listen_addresses=127.0.0.1"], user=user)

    def ready() -> bool:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=st.pg_port, user="foresight", password=st.db_password,
                         dbname="postgres").close()
        return True

    wait_for(ready, svc, "connection")
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=st.pg_port, user="foresight", password=st.db_password,
                            dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for db in ("mlflow", "prefect"):  # deployments/postgres-init.sql
            cur.execute(f"CREATE DATABASE {db}")
    conn.close()


def start_stack(root: Path) -> Stack:
    ports = {k: free_port() for k in ("pg", "s3", "mlflow", "prefect", "ray", "ray_client")}
    st = Stack(root=root, db_password="pg-" + secrets.token_hex(12), s3_key="AKIA" + secrets.token_hex(8).upper(),
               s3_secret="s3-" + secrets.token_hex(16), pg_port=ports["pg"], s3_url=f"http://127.0.0.1:{ports['s3']}",
               mlflow_url=f"http://127.0.0.1:{ports['mlflow']}", prefect_api=f"http://127.0.0.1:{ports['prefect']}/api",
               ray_address=f"127.0.0.1:{ports['ray']}", ray_temp=Path(f"/tmp/ray-it-{ports['ray']}"),
               pg_home=Path(tempfile.mkdtemp(prefix="foresight-it-pg-")), worker_env={})
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_", "RAY_"))
            and k != "FORESIGHT_WORK_DIR"}
    base.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                RAY_USAGE_STATS_ENABLED="0", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    s3_env = {"AWS_ACCESS_KEY_ID": st.s3_key, "AWS_SECRET_ACCESS_KEY": st.s3_secret, "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        _start_postgres(st)

        # S3 (docker-compose: minio + minio-init)
        s3 = st.service("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])], env=base)
        wait_for(lambda: http_ok(st.s3_url + "/"), s3, "HTTP answer")
        import boto3

        client = boto3.client("s3", endpoint_url=st.s3_url, **{k.lower(): v for k, v in s3_env.items()
                                                                 if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
        for bucket in ("foresight", "mlflow"):
            client.create_bucket(Bucket=bucket)

        # MLflow: Postgres backend (the URL in the environment, not on the command line), S3 artifacts
        mlflow_env = {**base, **s3_env, "MLFLOW_S3_ENDPOINT_URL": st.s3_url, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                      "MLFLOW_BACKEND_STORE_URI":
                          f"postgresql+psycopg2://foresight:{st.db_password}@127.0.0.1:{st.pg_port}/mlflow"}
        ml = st.service("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]),
                                   "--workers", "1", "--artifacts-destination", "s3://mlflow/artifacts"], env=mlflow_env)

        # Prefect server on its own database, scheduler on a short loop
        prefect_env = {**base, "PREFECT_API_DATABASE_CONNECTION_URL":
                       f"postgresql+asyncpg://foresight:{st.db_password}@127.0.0.1:{st.pg_port}/prefect",
                       "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
        pf = st.service("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                           "--port", str(ports["prefect"])], env=prefect_env)

        # Ray: a head and a second node joined to it, by `ray start`
        # Ray 2.60 cannot keep a multi-node cluster on loopback: `--node-ip-address=127.0.0.1` is swapped for
        # the machine's address and the GCS and raylets listen on every interface (ray-project/ray#59110,
        # #59852); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 would keep them on 127.0.0.1 but refuses a second node.
        ray_env = {**base, **s3_env, "AWS_ENDPOINT_URL": st.s3_url, "RAY_AUTH_MODE": "disabled"}
        head = st.service("ray-head", [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                       f"--port={ports['ray']}", f"--ray-client-server-port={ports['ray_client']}",
                                       "--num-cpus=1", "--include-dashboard=false",
                                       "--object-store-memory=200000000", f"--temp-dir={st.ray_temp}",
                                       "--disable-usage-stats"], env=ray_env)
        wait_for(lambda: subprocess.run([str(BIN / "ray"), "status", "--address", st.ray_address], env=ray_env,
                                        capture_output=True, timeout=30).returncode == 0, head, "ray status", 180)
        node = st.service("ray-node", [str(BIN / "ray"), "start", "--block", f"--address={st.ray_address}",
                                       "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                       "--object-store-memory=200000000", "--disable-usage-stats"], env=ray_env)

        def two_nodes() -> bool:
            out = subprocess.run([str(BIN / "ray"), "status", "--address", st.ray_address], env=ray_env,
                                 capture_output=True, text=True, timeout=30).stdout
            return out.count("node_") >= 2

        wait_for(two_nodes, node, "two alive Ray nodes", 180)
        wait_for(lambda: http_ok(st.mlflow_url + "/health"), ml, "/health", 180)
        wait_for(lambda: http_ok(st.prefect_api + "/health"), pf, "/api/health", 180)

        # the pipeline's environment: what docker-compose.yml's x-foresight-env gives the worker
        st.worker_env = {**base, **s3_env, "PREFECT_API_URL": st.prefect_api, "MLFLOW_TRACKING_URI": st.mlflow_url,
                         "RAY_ADDRESS": st.ray_address, "FORESIGHT_WORK_DIR": "s3://foresight/work",
                         "AWS_ENDPOINT_URL": st.s3_url, "RAY_AUTH_MODE": "disabled"}
        pool = subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"],
                              env=st.env(), capture_output=True, text=True, timeout=120)
        if pool.returncode != 0:
            raise RuntimeError(f"prefect work-pool create: {pool.stdout[-2000:]}{pool.stderr[-2000:]}")
        worker = st.service("prefect-worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type",
                                               "process", "--prefetch-seconds", "5"], env=st.env(), cwd=ROOT)
        wait_for(lambda: "started" in worker.tail(200).lower() or "polling" in worker.tail(200).lower(), worker,
                 "worker start", 120)
    except BaseException:
        for svc in st.services.values():
            print(f"--- {svc.name} log ---\n{svc.tail(30)}", file=sys.stderr)
        st.stop()
        shutil.rmtree(st.ray_temp, ignore_errors=True)
        shutil.rmtree(st.pg_home, ignore_errors=True)
        raise
    return st

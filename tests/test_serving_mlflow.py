"""The registered agent served by MLflow's own scoring server: `mlflow models serve -m models:/<name>@champion`
on 127.0.0.1 answers with the agent's confidence and turns, and a bad row gets its error, not a crash."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from foresight_core.config import ModelConfig
from foresight_core.models import load_model, save_model
from tasks.evaluate import TASK_SCORES
from tasks.registry import register_and_promote
from tasks.tracking import mlflow_client, start_run

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def registered_tiny_agent(cfg, tmp_path) -> str:
    """The tiny model as a stage would leave it (weights in a run, an evaluation), registered as champion."""
    model, tokenizer = load_model(ModelConfig(source="tiny"), train=False)
    folder = save_model(model, tokenizer, tmp_path / "weights")
    train = start_run(cfg, "fc_rl-tiny", "fc_rl")
    train.log_artifacts(str(folder), "model")
    train.finish()
    ev = start_run(cfg, "eval-tiny", "eval")
    ev.log_dict({"direct": {"sw/a": 0.0}}, TASK_SCORES)
    ev.finish()
    ref = register_and_promote(cfg, f"runs:/{train.run_id}/model", ev.run_id, {})
    assert ref["registry.promoted"] == "true"
    return ref["registry.alias_uri"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_models_serve_answers_with_confidence(tiny_cfg, tmp_path):
    uri = registered_tiny_agent(tiny_cfg, tmp_path)
    assert uri == "models:/foresight-tiny@champion"
    # the same model in process first (a clear failure here beats a server that never comes up)
    import mlflow.pyfunc

    os.environ["MLFLOW_TRACKING_URI"] = tiny_cfg.infra.tracking.tracking_uri
    try:
        agent = mlflow.pyfunc.load_model(uri)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    out = agent.predict([{"question": "What is 6 * 7?", "env": "math", "max_turns": 1}])
    assert "error" not in out[0] and isinstance(out[0]["turns"], list)

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tiny_cfg.infra.tracking.tracking_uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}  # uvicorn, as an activated venv
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([MLFLOW, "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port), "-w", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the scoring server did not come up in 180 s"
            time.sleep(1)
        rows = [{"question": "Where was the founder of the Velmor Institute born?", "env": "search", "max_turns": 2},
                {"question": "What is 6 * 7?", "env": "math", "max_turns": 1},
                {"question": "", "env": "search"}, {"question": "x", "env": "chess"},
                {"question": "y" * 10_000, "env": "math"}]
        status, body = post(port, {"dataframe_records": rows})
        assert status == 200, body
        preds = body["predictions"]
        assert len(preds) == 5
        for p in preds[:2]:
            assert "error" not in p or p["error"] is None, p
            assert p["confidence"] is None or 0.0 <= p["confidence"] <= 1.0
            assert isinstance(p["turns"], list) and p["turns"] and isinstance(p["abstained"], bool)
            assert {"imaginary", "keywords", "confidence", "action", "observation"} <= set(p["turns"][0])
        assert preds[2]["error"] == "question must be a non-empty string"
        assert "env must be one of" in preds[3]["error"] and "10000 characters" in preds[4]["error"]
        # the server is still up after the bad rows
        status, body = post(port, {"dataframe_records": [{"question": "What is 1 + 1?", "env": "math",
                                                          "max_turns": 1, "min_confidence": 1.0}]})
        assert status == 200 and body["predictions"][0]["abstained"] is True
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def test_foresight_ask_plays_the_champion_turn_by_turn(tiny_cfg, tmp_path, capsys):
    from flows import cli

    registered_tiny_agent(tiny_cfg, tmp_path)
    where = ["--preset", "tiny", "--set", f"work_dir={tiny_cfg.work_dir}",
             "--set", f"infra.tracking.tracking_uri={tiny_cfg.infra.tracking.tracking_uri}"]
    assert cli.main(["ask", "What is 6 * 7?", "--env", "math", "--max-turns", "1", "--min-confidence", "0.5",
                     *where]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("turn 1") and any(ln.startswith("answer: ") for ln in out)
    assert any(ln.startswith("tokens: ") for ln in out)
    assert cli.main(["ask", "", *where]) == 2
    assert "question must be a non-empty string" in capsys.readouterr().err
    assert cli.main(["ask", "q", "--model", "models:/nope@champion", *where]) == 2
    assert "cannot load the agent models:/nope@champion" in capsys.readouterr().err

"""The python tool's sandbox: ordinary code works, hostile code comes back as a contained error.

Every hostile program carries a unique marker in its source (the source travels on the command
line), so ``_stray(marker)`` finds any process it left behind, whatever uid it runs as.
The bwrap tests run wherever bubblewrap is installed (CI: ``apt-get install -y bubblewrap``).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from foresight_core.config.envs import SandboxConfig
from foresight_core.envs.sandbox import SandboxError, SandboxResult, bwrap_available, run_python

IS_ROOT = os.geteuid() == 0
needs_bwrap = pytest.mark.skipif(not bwrap_available(),
                                 reason="bubblewrap not installed (apt-get install -y bubblewrap)")
BACKENDS = [pytest.param("bwrap", marks=needs_bwrap), "rlimit"]
# What the rlimit backend cannot promise: it shares the host's network and world-writable folders,
# and run by a non-root user it cannot change uid (no process limit apart from the user's own).
ISOLATING = [pytest.param("bwrap", marks=needs_bwrap)]


def _cfg(backend: str, **kw) -> SandboxConfig:
    return SandboxConfig(backend=backend, **{"cpu_seconds": 2, "wall_seconds": 6, **kw})


def _hostile(body: str) -> tuple[str, str]:
    marker = f"hostile-{uuid.uuid4().hex}"
    return f"# {marker}\n{body}", marker


def _stray(marker: str) -> list[int]:
    """Pids of live processes whose command line carries ``marker`` (zombies have none)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    found.append(int(name))
            except OSError:
                pass
    return found


def _contained(res: SandboxResult, marker: str) -> None:
    assert not res.ok and res.error, res
    assert _stray(marker) == [], f"processes left behind: {_stray(marker)}"


@pytest.fixture
def victim():
    """A host folder the sandbox can see (inside the repo's tests/, or /var/lib when the repo itself lies
    under a folder bwrap hides, such as a CI clone under /tmp).

    The tests open it up (mode 0777, file 0666) where only the sandbox's read-only view of the
    host protects it, and keep the usual 0755 / 0644 where only the unprivileged uid does.
    """
    here = Path(__file__).resolve().parent
    hidden = ("/tmp", "/root", "/home", "/run", "/var/tmp")  # what bwrap covers with a tmpfs
    base = here
    if str(here).startswith(tuple(h + "/" for h in hidden)):  # a clone under /tmp (CI): pick a visible place
        base = next((Path(p) for p in ("/var/lib", "/opt", "/srv") if os.access(p, os.W_OK)), here)
    d = Path(tempfile.mkdtemp(prefix="foresight-victim-", dir=base))
    d.chmod(0o755)
    (d / "keep.txt").write_text("precious")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _open_up(d: Path) -> None:
    d.chmod(0o777)
    (d / "keep.txt").chmod(0o666)


# ---------------------------------------------------------------------------------------------
# Ordinary code


@pytest.mark.parametrize("backend", BACKENDS)
def test_stdout_comes_back(backend):
    res = run_python("x = 17 * 3\nprint(x + 3)", _cfg(backend))  # 17 * 3 + 3 = 54
    assert res.ok and res.output == "54\n" and res.error is None and res.observation() == "54"


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_are_short(backend):
    res = run_python("def f(x):\n    return x / 0\nprint('before')\nf(1)", _cfg(backend))
    assert not res.ok and res.error == "ZeroDivisionError: division by zero"
    assert res.observation() == "before\nZeroDivisionError: division by zero"
    syntax = run_python("print(1 +)", _cfg(backend))
    assert syntax.error is not None and syntax.error.startswith("SyntaxError")
    assert run_python("pass", _cfg(backend)).observation() == "(no output)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_working_folder_is_writable_and_deterministic(backend):
    code = "open('notes.txt', 'w').write('abc')\nprint(open('notes.txt').read(), hash('foresight'))"
    a, b = run_python(code, _cfg(backend)), run_python(code, _cfg(backend))
    assert a.ok and a.output.startswith("abc ")
    assert a.output == b.output  # PYTHONHASHSEED=0: str hashes (and set order) replay identically


def test_missing_bwrap_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxError, match="apt-get install -y bubblewrap"):
        run_python("print(1)", SandboxConfig(backend="bwrap"))


def test_a_bwrap_that_cannot_create_namespaces_is_a_clear_error(monkeypatch, tmp_path):
    """What a container without the seccomp / AppArmor exemptions sees: the error says what to grant."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(SandboxError, match=r"No permissions to creating new namespace.*user namespaces.*security_opt"):
        run_python("print(1)", SandboxConfig(backend="bwrap"))


def test_null_bytes_and_huge_code_are_refused():
    assert run_python("print(1)\x00", _cfg("rlimit")).error.startswith("SyntaxError")
    assert run_python("#" * 200_000, _cfg("rlimit")).error.startswith("ValueError")


# ---------------------------------------------------------------------------------------------
# Hostile code


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_loop_hits_cpu_limit(backend):
    code, marker = _hostile("while True:\n    pass")
    # a generous wall clock, so that the CPU limit is what stops it even on a busy machine
    res = run_python(code, _cfg(backend, cpu_seconds=1, wall_seconds=60))
    assert res.timed_out and res.error == "TimeoutError: exceeded the 1 s CPU-time limit"
    _contained(res, marker)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sleeper_hits_wall_clock(backend):
    # sleeping uses no CPU: only the wall clock stops it; its child sleeps in a new session
    code, marker = _hostile("import os, time\nif os.fork() == 0:\n    os.setsid()\ntime.sleep(60)")
    t0 = time.monotonic()
    res = run_python(code, _cfg(backend, wall_seconds=1.0))
    assert res.timed_out and res.error == "TimeoutError: exceeded the 1 s wall-clock limit"
    assert time.monotonic() - t0 < 5
    _contained(res, marker)


@pytest.mark.parametrize("backend", BACKENDS)
def test_orphans_do_not_outlive_the_program(backend):
    # the program exits at once (ok) but leaves a detached sleeper behind: it must be killed too
    code, marker = _hostile("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('bye')")
    res = run_python(code, _cfg(backend))
    if backend == "rlimit" and not IS_ROOT:
        pytest.skip("rlimit without root cannot tell the sandbox's processes from the user's")
    assert res.ok and res.output == "bye\n"
    assert _stray(marker) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_bomb(backend):
    if backend == "rlimit" and not IS_ROOT:
        pytest.skip("rlimit without root: RLIMIT_NPROC counts all of the user's processes")
    code, marker = _hostile("import os\nwhile True:\n    os.fork()")
    res = run_python(code, _cfg(backend, max_processes=16))
    assert "Resource temporarily unavailable" in res.error or res.timed_out, res.error
    _contained(res, marker)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subprocess_bomb(backend):
    if backend == "rlimit" and not IS_ROOT:
        pytest.skip("rlimit without root: RLIMIT_NPROC counts all of the user's processes")
    code, marker = _hostile(
        "import subprocess, sys\nwhile True:\n"
        "    subprocess.Popen([sys.executable, '-S', '-c', 'import time; time.sleep(60)'])")
    res = run_python(code, _cfg(backend, max_processes=16))
    assert "BlockingIOError" in res.error or res.timed_out, res.error
    _contained(res, marker)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bomb(backend):
    code, marker = _hostile("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))")
    res = run_python(code, _cfg(backend, memory_mb=256))
    assert res.error == "MemoryError"
    _contained(res, marker)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_output_is_cut_and_stopped(backend):
    code, marker = _hostile("while True:\n    print('y' * 1000)")
    res = run_python(code, _cfg(backend, max_output_chars=100, kill_output_bytes=200_000))
    assert res.truncated and res.output.startswith("y" * 100 + "\n[... output truncated")
    assert len(res.output) < 200  # 100 chars + the marker line, not 200 kB
    assert res.error.startswith("OutputLimitError")
    _contained(res, marker)
    # a long but finite print is drained and cut, the program finishes normally
    long = run_python("print('z' * 50_000)", _cfg(backend, max_output_chars=100))
    assert long.ok and long.truncated and long.output.startswith("z" * 100 + "\n[... output truncated: 50001 bytes")


@pytest.mark.parametrize("backend", BACKENDS)
def test_host_environment_is_unreadable(backend, monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("FORESIGHT_TEST_SECRET", secret)
    code, marker = _hostile(
        "import os\nprint(dict(os.environ))\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n"
        "        for f in ('environ', 'cmdline'):\n"
        "            try:\n"
        "                print(open(f'/proc/{pid}/{f}', 'rb').read())\n"
        "            except OSError:\n"
        "                pass\n")
    res = run_python(code, _cfg(backend, max_output_chars=200_000))
    assert res.ok, res.error
    assert "FORESIGHT_TEST_SECRET" not in res.output and secret not in res.output
    assert "PATH" in res.output  # it did print an environment: the sandbox's own


@pytest.mark.parametrize("backend", BACKENDS)
def test_rm_rf_of_host_folder_fails(backend, victim):
    if backend == "rlimit" and not IS_ROOT:
        pytest.skip("rlimit without root runs as the caller, who owns the folder")
    if backend == "bwrap":
        _open_up(victim)  # only the read-only mount stands in the way
    code, marker = _hostile(
        f"import shutil, subprocess\nsubprocess.run(['rm', '-rf', {str(victim)!r}])\n"
        f"shutil.rmtree({str(victim)!r})")
    res = run_python(code, _cfg(backend))
    assert res.error and ("Read-only file system" in res.error or "Permission denied" in res.error), res.error
    assert (victim / "keep.txt").read_text() == "precious"
    _contained(res, marker)


@pytest.mark.parametrize("backend", ISOLATING)
def test_no_writes_outside_the_working_folder(backend, victim):
    _open_up(victim)  # only the read-only mount stands in the way
    host_tmp = Path(tempfile.gettempdir()) / f"escape-{uuid.uuid4().hex}"
    targets = [victim / "new.txt", victim / "keep.txt", host_tmp, Path("/etc/foresight-escape")]
    code, marker = _hostile(
        "wrote = []\n"
        f"for path in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('pwned')\n"
        "        wrote.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(wrote)")
    res = run_python(code, _cfg(backend))
    # host_tmp is written (and vanishes with it): the sandbox's /tmp is its own tmpfs
    assert res.ok and res.output == f"[{str(host_tmp)!r}]\n"
    assert not host_tmp.exists() and not (victim / "new.txt").exists()
    assert not Path("/etc/foresight-escape").exists()
    assert (victim / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_size_and_disk_limits(backend):
    code, marker = _hostile("open('big.bin', 'wb').write(b'0' * (8 << 20))")
    res = run_python(code, _cfg(backend, disk_mb=4))
    assert "File too large" in res.error or "No space left" in res.error, res.error
    _contained(res, marker)


@pytest.mark.parametrize("backend", ISOLATING)
def test_no_network(backend):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        code, marker = _hostile(
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        res = run_python(code, _cfg(backend))
        assert res.error == "ConnectionRefusedError: [Errno 111] Connection refused", res.error
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody knocked
    outside = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)", _cfg(backend))
    assert outside.error == "OSError: [Errno 101] Network is unreachable", outside.error
    _contained(res, marker)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overhead_per_call(backend):
    run_python("pass", _cfg(backend))  # warm the page cache
    t0 = time.perf_counter()
    for _ in range(5):
        assert run_python("print(1)", _cfg(backend)).ok
    ms = (time.perf_counter() - t0) / 5 * 1000
    assert ms < 500, f"{backend}: {ms:.0f} ms per call"  # ~15-20 ms on an idle 2-core machine

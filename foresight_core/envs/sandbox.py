"""Run model-written python in a sandbox: the `<python>` tool of the maths environment.

    from foresight_core.config.envs import SandboxConfig
    from foresight_core.envs.sandbox import run_python
    res = run_python("print(6 * 7)", SandboxConfig())
    res.ok, res.output, res.error        # True, "42\\n", None
    res.observation()                    # what the model is shown: stdout, then the short error

Every call starts a fresh interpreter (the same python as the host, ``-S``: no site hooks; the host's
site-packages are on ``sys.path`` read-only, so numpy / sympy import) in a separate process, with:

- limits: CPU time (RLIMIT_CPU), memory (RLIMIT_AS), size of any written file (RLIMIT_FSIZE), open
  files, no core dumps, processes (RLIMIT_NPROC) and a wall clock after which the whole sandbox is
  killed; stdout is read at most ``max_output_chars`` deep (the rest is drained and dropped, never
  buffered) and the program is stopped once it has written ``kill_output_bytes``;
- a scrubbed environment: the sandbox and the launcher itself start from an empty environment, so
  no host variable (tokens, keys) is readable, not even through /proc;
- another user: run as root (our case, CI too), the code runs as a fresh unused uid picked per call,
  because the kernel does not apply RLIMIT_NPROC to uid 0 -- a fork bomb would otherwise be bounded
  by nothing but the wall clock. Being another user, the code also cannot write host files.

Backends (``SandboxConfig.backend``):

- ``bwrap`` (bubblewrap, ``apt-get install bubblewrap``): own network namespace (only a private
  loopback: no network at all), own PID namespace (host processes are invisible; killing its
  init kills everything inside), own IPC/UTS namespaces, the whole filesystem read-only, ``/tmp`` a
  fresh size-limited tmpfs that is the code's working folder and only writable place, the host's
  home folders (/root, /home) and /run hidden (the interpreter's folders are bound back read-only).
  Not covered: there is no seccomp filter, so the code may still create its own user namespace
  (and in it mount a tmpfs outside the size limit, until the wall clock ends it).
- ``rlimit``: a plain subprocess with the same limits, environment and (as root) the unused uid, in
  a fresh host temp folder that is deleted afterwards. It CANNOT cut the network, hide host files
  from reading (as root it even keeps CAP_DAC_READ_SEARCH when the interpreter lives in a folder
  other users cannot enter, e.g. /root/.pyenv) or stop writes to world-writable folders such as
  /tmp. Use it only for trusted code or where bubblewrap cannot run.

Overhead per call on an idle 2-core machine: bwrap ~17 ms, rlimit ~13 ms (a bare ``python -S``
start is ~6 ms of it); about 2-3x that when the cores are busy. ``MathEnv`` caches results of
identical code, so Monte Carlo replays of a trajectory prefix run each distinct program once.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cache

from foresight_core.config.envs import SandboxConfig

MAX_CODE_CHARS = 100_000
"""Longer programs are refused (they travel as one argv string, capped by the kernel at 128 KiB)."""
_UID_RANGE = (40_000, 60_000)
"""Unused uids the code runs as when we are root (inside the 16-bit range, so rootless containers map them)."""
_STDERR_TAIL = 8192
"""Bytes of stderr kept (the end: a traceback's last line is what the model gets)."""
_SANDBOX_TMP = "/tmp"
"""The bwrap sandbox's working folder (a fresh tmpfs)."""
_MASKED = ("/root", "/home", "/run", "/var/tmp")
"""Host folders hidden behind an empty tmpfs in the bwrap sandbox."""

# Runs first inside the sandbox (as `python -c _BOOT spec code`): set the limits, drop to the
# sandbox uid, report "ok" on the status fd, then run the model's code as __main__.
_BOOT = r"""
import os, resource, sys
def _foresight_boot():
    spec = [int(x) for x in sys.argv[1].split(",")]
    cpu, mem, fsize, nproc, status_fd, uid = spec
    code = sys.argv[2]
    limits = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
              (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_NPROC, nproc, nproc),
              (resource.RLIMIT_NOFILE, 256, 256), (resource.RLIMIT_CORE, 0, 0)]
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))
    if uid >= 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    sys.path.extend(p for p in sys.argv[3:] if p)
    sys.argv = ["<python>"]
    sys.stdout.reconfigure(line_buffering=True)
    os.write(status_fd, b"ok")
    os.close(status_fd)
    return compile(code, "<python>", "exec")
def _foresight_run():
    code = _foresight_boot()
    g = vars(sys.modules["__main__"])  # run as the real __main__, cleared of the boot's names
    for name in [n for n in g if not (n.startswith("__") and n.endswith("__"))]:
        del g[name]
    exec(code, g)
_foresight_run()
"""


CONTAINER_HINT = (". bubblewrap needs unprivileged user namespaces: on a host, kernel.unprivileged_userns_clone=1 "
                  "(and no AppArmor rule refusing them); in a container, the seccomp and AppArmor exemptions that "
                  "docker-compose.yml gives the services running pipeline code (security_opt). "
                  "envs.math.sandbox.backend=rlimit runs trusted code without isolation")


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not the model's fault): missing bwrap, no namespaces, ..."""


@dataclass
class SandboxResult:
    """The outcome of one program."""

    ok: bool
    """Exited with status 0 within every limit."""
    output: str
    """Stdout, cut to ``max_output_chars`` (with a marker saying so)."""
    error: str | None = None
    """Short error for the model: a traceback's last line, ``TimeoutError: ...``, ``MemoryError``..."""
    timed_out: bool = False
    """Stopped by the wall clock or the CPU-time limit."""
    exit_code: int | None = None
    """Exit status (negative: killed by that signal)."""
    truncated: bool = False
    """Stdout was longer than ``max_output_chars``."""
    wall_ms: float = 0.0
    """Wall-clock time of the call, start-up included."""
    uid: int | None = None
    """The uid the code ran as (None: the caller's own)."""

    def observation(self) -> str:
        """The text shown to the model: stdout, then the error line; ``(no output)`` when both are empty."""
        parts = [self.output.rstrip("\n")] if self.output.strip() else []
        if self.error:
            parts.append(self.error)
        return "\n".join(parts) if parts else "(no output)"


def run_python(code: str, cfg: SandboxConfig) -> SandboxResult:
    """Run ``code`` in a fresh sandboxed interpreter and return its (short) output or error.

    Raises ``SandboxError`` only when the sandbox cannot start; anything the code does (crash,
    loop, bomb) comes back as a result with ``ok=False``.
    """
    if len(code) > MAX_CODE_CHARS:
        return SandboxResult(ok=False, output="", error=f"ValueError: code longer than {MAX_CODE_CHARS} characters")
    if "\x00" in code:
        return SandboxResult(ok=False, output="", error="SyntaxError: source code cannot contain null bytes")
    uid = _pick_uid() if os.geteuid() == 0 else None
    workdir = None
    if cfg.backend == "bwrap":
        cwd, env = "/", _child_env(_SANDBOX_TMP)
    else:
        workdir = tempfile.mkdtemp(prefix="foresight-sandbox-")
        if uid is not None:
            os.chown(workdir, uid, uid)
        cwd, env = workdir, _child_env(workdir)
    status_r, status_w = os.pipe()  # the boot step writes "ok" here once the limits are in place
    info_r, info_w = os.pipe() if cfg.backend == "bwrap" else (-1, -1)  # bwrap writes its init's pid here
    try:
        try:
            spec = ",".join(str(v) for v in (
                cfg.cpu_seconds, cfg.memory_mb << 20, cfg.disk_mb << 20, cfg.max_processes, status_w,
                uid if (uid is not None and cfg.backend == "bwrap") else -1))  # rlimit: setpriv drops the uid
            boot = [sys.executable, "-S", "-s", "-B", "-c", _BOOT, spec, code, *_site_paths()]
            if cfg.backend == "bwrap":
                argv, fds = _bwrap_argv(cfg, env, boot, root=uid is not None, info_fd=info_w), (status_w, info_w)
            else:
                argv, fds = _rlimit_argv(boot, uid), (status_w,)
        except BaseException:
            for fd in (status_w, info_w):
                if fd >= 0:
                    os.close(fd)
            raise
        return _supervise(argv, cfg, cwd, env, fds, status_r, info_r, uid)  # closes fds once started
    finally:
        for fd in (status_r, info_r):
            if fd >= 0:
                os.close(fd)
        _release_uid(uid)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Launch


def _bwrap_argv(cfg: SandboxConfig, env: dict[str, str], boot: list[str], root: bool, info_fd: int) -> list[str]:
    bwrap = _bwrap_path()
    argv = [bwrap, "--info-fd", str(info_fd),
            "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--perms", "1777", "--size", str(cfg.disk_mb << 20), "--tmpfs", _SANDBOX_TMP]
    for d in _MASKED:
        if os.path.isdir(d) and not os.path.islink(d):
            argv += ["--tmpfs", d]
    for p in _interpreter_dirs():
        for d in (*_MASKED, _SANDBOX_TMP):  # e.g. a venv under /tmp (CI clones) must stay runnable
            if p.startswith(d + "/"):  # bind it back; the folders on the way must be enterable
                parts = p[len(d) + 1:].split("/")
                for i in range(1, len(parts)):
                    argv += ["--perms", "0755", "--dir", d + "/" + "/".join(parts[:i])]
                argv += ["--ro-bind", p, p]
    argv += ["--chdir", _SANDBOX_TMP, "--clearenv"]
    for k, v in env.items():
        argv += ["--setenv", k, v]
    if root:  # keep only what the boot step needs to drop to the sandbox uid; gone after the drop
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return argv + ["--", *boot]


def _rlimit_argv(boot: list[str], uid: int | None) -> list[str]:
    if uid is None:
        return boot
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise SandboxError("the rlimit backend runs as root and needs `setpriv` (util-linux) to drop to "
                           "an unprivileged uid")
    caps = ["--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search"] \
        if not _interpreter_world_reachable() else ["--inh-caps=-all"]
    return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *caps, "--no-new-privs", "--", *boot]


def _child_env(home: str) -> dict[str, str]:
    """The whole environment the sandbox sees (and the launcher runs with): nothing from the host."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _bwrap_path() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxError("sandbox backend 'bwrap' needs bubblewrap: install it with "
                           "`apt-get install -y bubblewrap` (Debian/Ubuntu), or set envs.math.sandbox.backend=rlimit "
                           "for trusted code only (no network isolation)")
    return path


def bwrap_available() -> bool:
    """True when the bubblewrap binary is installed (tests skip the bwrap backend otherwise)."""
    return shutil.which("bwrap") is not None


@cache
def _site_paths() -> tuple[str, ...]:
    """The host's site-packages, appended to the sandbox's sys.path (read-only; no .pth hooks run)."""
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return tuple(sorted(p for p in paths if os.path.isdir(p)))


@cache
def _interpreter_dirs() -> tuple[str, ...]:
    """Folders the interpreter needs: its prefixes, the real binary's folder, site-packages."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable)), *_site_paths()}
    real = sorted({os.path.realpath(d) for d in dirs if os.path.isdir(d)})
    # drop folders inside another listed folder (one bind covers them)
    return tuple(d for d in real if not any(d != o and d.startswith(o + "/") for o in real))


@cache
def _interpreter_world_reachable() -> bool:
    """Can a stranger uid enter every folder on the way to the interpreter and its libraries?"""
    for d in _interpreter_dirs():
        path = "/"
        for part in d.strip("/").split("/"):
            path = os.path.join(path, part)
            if not os.stat(path).st_mode & 0o001:
                return False
    return True


_UID_RNG = random.SystemRandom()  # not the global RNG: sandbox calls must not shift seeded streams
_UIDS_IN_USE: set[int] = set()
_UIDS_LOCK = threading.Lock()


def _pick_uid() -> int:
    """A uid no account owns and no other call of this process is using (released by ``_release_uid``)."""
    while True:
        uid = _UID_RNG.randrange(*_UID_RANGE)
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        with _UIDS_LOCK:
            if uid not in _UIDS_IN_USE:
                _UIDS_IN_USE.add(uid)
                return uid


def _release_uid(uid: int | None) -> None:
    if uid is not None:
        with _UIDS_LOCK:
            _UIDS_IN_USE.discard(uid)


# ---------------------------------------------------------------------------------------------
# Supervise: read bounded output, enforce the wall clock, kill everything left


def _supervise(argv: list[str], cfg: SandboxConfig, cwd: str, env: dict[str, str], fds: tuple[int, ...],
               status_r: int, info_r: int, uid: int | None) -> SandboxResult:
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, pass_fds=fds, start_new_session=True)
    except OSError as e:
        raise SandboxError(f"could not start the sandbox ({argv[0]}): {e}") from e
    finally:
        for fd in fds:
            os.close(fd)
    keep_out = cfg.max_output_chars * 4 + 4  # utf-8: at most 4 bytes per character
    out, err = bytearray(), bytearray()
    n_out = n_total = 0
    timed_out = overflow = False
    main_done: float | None = None
    deadline = t0 + cfg.wall_seconds
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(min(left, 0.05)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                n_total += len(chunk)
                if key.fileobj is proc.stdout:
                    n_out += len(chunk)
                    out += chunk[: max(0, keep_out - len(out))]
                else:
                    err = (err + chunk)[-_STDERR_TAIL:]
            if n_total > cfg.kill_output_bytes:
                overflow = True
                break
            if cfg.backend == "rlimit" and proc.poll() is not None:  # bwrap: its PID namespace ends with main
                if main_done is None:  # the main program is done: children still holding the pipes go too
                    main_done = time.monotonic()
                    _kill_group(proc)
                    if uid is not None:
                        _kill_uid(uid)
                elif time.monotonic() - main_done > 0.5:
                    break  # without a uid of its own, detached children are out of reach: stop reading
        if timed_out or overflow:
            _stop(proc, info_r)
        rc = proc.wait()
    finally:
        stopped = timed_out or overflow or proc.poll() is None
        if proc.poll() is None:  # an exception on our side: leave nothing running
            _stop(proc, info_r)
            proc.wait()
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
        # bwrap exits only after everything in its PID namespace is gone; check when we had to stop it
        if uid is not None and (cfg.backend == "rlimit" or stopped):
            _kill_uid(uid)
    started = _read_ready(status_r) == b"ok"
    wall_ms = (time.monotonic() - t0) * 1000
    if not started and not timed_out:
        hint = CONTAINER_HINT if cfg.backend == "bwrap" else ""
        raise SandboxError(f"the sandbox failed to start ({os.path.basename(argv[0])} exit {rc}): "
                           f"{bytes(err).decode('utf-8', 'replace').strip()[-500:]}{hint}")
    return _result(cfg, bytes(out), n_out, bytes(err), rc, timed_out, overflow, wall_ms, uid)


def _result(cfg: SandboxConfig, out: bytes, n_out: int, err: bytes, rc: int, timed_out: bool, overflow: bool,
            wall_ms: float, uid: int | None) -> SandboxResult:
    text = out.decode("utf-8", "replace")
    truncated = n_out > len(out) or len(text) > cfg.max_output_chars
    if truncated:
        text = text[: cfg.max_output_chars] + f"\n[... output truncated: {n_out} bytes in all]"
    # bwrap reports a signal death as 128 + signal number, a plain subprocess as -signal
    sig = -rc if rc < 0 else (rc - 128 if cfg.backend == "bwrap" and 128 < rc < 160 else 0)
    error: str | None = None
    if timed_out:
        error = f"TimeoutError: exceeded the {cfg.wall_seconds:g} s wall-clock limit"
    elif overflow:
        error = f"OutputLimitError: more than {cfg.kill_output_bytes} bytes of output; the program was stopped"
    elif sig in (signal.SIGXCPU, signal.SIGKILL):
        timed_out = True
        error = f"TimeoutError: exceeded the {cfg.cpu_seconds} s CPU-time limit"
    elif sig:
        error = f"Crashed: killed by {signal.Signals(sig).name}" if sig in signal.valid_signals() else \
            f"Crashed: exit status {rc}"
    elif rc != 0:
        error = _last_line(err) or f"SystemExit: {rc}"
    return SandboxResult(ok=error is None, output=text, error=error, timed_out=timed_out, exit_code=-sig if sig else rc,
                         truncated=truncated, wall_ms=wall_ms, uid=uid)


def _last_line(err: bytes, limit: int = 300) -> str:
    """The error line of the last traceback (several processes may interleave theirs)."""
    lines = [ln.rstrip() for ln in err.decode("utf-8", "replace").splitlines()]
    lines = [ln for ln in lines if ln and not ln[0].isspace() and not ln.startswith("Traceback (")
             and not ln.startswith("During handling of") and not ln.startswith("The above exception")]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _read_ready(fd: int) -> bytes:
    """What a pipe holds now, without waiting (another process may still hold its write end)."""
    if fd < 0:
        return b""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def _stop(proc: subprocess.Popen, info_r: int) -> None:
    """Kill the sandbox now.

    bwrap: kill the init of its PID namespace; the kernel kills everything inside, and bwrap exits
    only once all of it is gone, so nothing outlives the call. Before bwrap has reported its init
    (or for the rlimit backend): kill the launcher's process group.
    """
    found = re.search(rb'"child-pid":\s*(\d+)', _read_ready(info_r))
    if found:
        try:
            os.kill(int(found.group(1)), signal.SIGKILL)
            proc.wait(timeout=5)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _uid_pids(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is ``uid``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read(2048)
        except OSError:
            continue  # exited meanwhile
        state = status.partition(b"\nState:")[2].split(None, 1)[:1]
        uids = status.partition(b"\nUid:")[2].split(None, 1)[:1]
        if uids and int(uids[0]) == uid and state != [b"Z"]:
            pids.append(int(name))
    return pids


def _kill_uid(uid: int, timeout: float = 5.0) -> None:
    """SIGKILL every process of the sandbox uid until none is left (it is unique to this call)."""
    end = time.monotonic() + timeout
    while True:
        pids = _uid_pids(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > end:
            raise SandboxError(f"could not kill the sandbox's processes (uid {uid}): {pids[:10]}")
        time.sleep(0.005)

"""A contained Python executor whose state persists across the turns of one trajectory.

    with Session(timeout=5.0) as session:
        session.run("x = 6 * 7")
        result = session.run("x")          # result.stdout == "42\\n" (a bare last expression prints)

Mechanism. A session is one long-lived worker process (this file run as `python -I sandbox.py
--worker`) that reads code over a pipe, executes it in one persistent namespace, and answers over
a second pipe; the code's stdout and stderr are two more pipes that the trainer drains while it
waits. A warm call costs a pipe round trip and an exec (well under a millisecond); starting a
worker costs a Python start-up (tens of milliseconds), paid once per trajectory rather than per
turn, and a fresh `python -c` per call would also lose the state between turns. Standard library
only.

Containment, and what it does NOT cover. Where the trainer runs as root and `unshare` works
(checked once, `isolation()` tells), the worker starts in new network, PID and mount namespaces:
    - Network: the namespace has only a loopback interface, and it is down: no connection to
      anything, not even to listeners on the host's 127.0.0.1.
    - Processes: the worker is PID 1 of its namespace; when it dies (close, timeout, crash) the
      kernel kills every process in it, including children that called setsid() or daemonised.
      The worker runs under a uid of its own (one per live session), so RLIMIT_NPROC bounds its
      processes and threads (fork bombs) without touching other sessions or the trainer.
    - Files: the work directory, /tmp, /var/tmp, /run/lock and /dev/shm are private size-limited
      tmpfs mounts that vanish with the namespace; with root dropped, nothing else is writable
      (files the host leaves world-writable would be; there are none by default).
    - The trainer is invisible: /proc shows the namespace's own processes only.
In every mode: a wall-clock timeout per call (the worker and all it spawned are killed; the next
call starts a fresh session and its result says the state was lost); RLIMIT_AS (memory),
RLIMIT_CPU (per call, plus a session budget), RLIMIT_FSIZE (file size), RLIMIT_NOFILE and no
core dumps; an environment with nothing inherited (no secrets; only PATH, HOME, LANG and
thread-count settings); stdin is /dev/null; stdout and stderr are drained while the code runs
and truncated to max_output bytes each, head and tail kept.
Fallback, where namespaces are not available (not root, or no `unshare`): the same limits on
an ordinary process group in a private temporary directory removed on close, BUT without
network isolation, with RLIMIT_NPROC counted against the whole user, with /tmp shared, and
with a child that calls setsid() able to outlive the session. Use a container or VM there.
This is not a security boundary against a determined attacker (kernel exploits, side channels,
reading world-readable files, forging answers on the protocol pipes): for untrusted models at
scale, run the trainer's sandboxes inside a container or VM (gVisor, Firecracker) as well.

Failures are attributed. Result.infra_error is True only when the sandbox itself failed (the
worker could not start or answer its start-up handshake); training leaves those trajectories
out of group statistics. Everything the code can cause, including killing or corrupting its
own worker, is the code's fault, so hostile code cannot turn a bad score into an excluded one.
"""

import ast
import contextlib
import ctypes
import errno
import itertools
import json
import linecache
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

_HEADER = struct.Struct("!I")  # length prefix of every protocol message
_UID_BASE = 1_000_000  # per-session uids: _UID_BASE + (pid % 100_000) * 1000 + slot
_slots = itertools.count()
_isolation = None


@dataclass
class Result:
    """What one call did. Only infra_error marks a failure of the sandbox rather than the code."""

    ok: bool  # the code ran to the end without an exception (sys.exit(0) counts as ok)
    stdout: str
    stderr: str  # the traceback, if any, ends here: its last lines are what the model needs
    timed_out: bool = False
    limit: str | None = None  # "time", "memory", "cpu", "file_size" or "processes" when hit
    duration: float = 0.0  # seconds, wall clock, as seen by the trainer
    infra_error: bool = False  # the sandbox failed, not the code: leave out of statistics
    state_lost: bool = False  # ran in a fresh worker: names defined by earlier calls are gone
    truncated: bool = False  # stdout or stderr was cut to max_output bytes (head and tail kept)


def isolation():
    """'namespaces' if workers can get their own network, PID and mount namespaces, else 'process'."""
    global _isolation
    if _isolation is None:
        _isolation = "process"
        if os.geteuid() == 0 and _which("unshare"):
            probe = subprocess.run(
                [*_UNSHARE, "true"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10
            )
            if probe.returncode == 0:
                _isolation = "namespaces"
    return _isolation


_UNSHARE = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc"]


def _which(name):
    return any(os.access(os.path.join(d, name), os.X_OK) for d in os.environ.get("PATH", "").split(":"))


class _Capped:
    """A byte buffer that keeps the first and last `limit // 2` bytes and counts what it drops."""

    def __init__(self, limit):
        self.limit, self.head, self.tail, self.dropped = limit, bytearray(), bytearray(), 0

    def add(self, data):
        room = self.limit // 2 - len(self.head)
        self.head += data[:room]
        self.tail += data[max(room, 0) :]
        excess = len(self.tail) - (self.limit - self.limit // 2)
        if excess > 0:
            del self.tail[:excess]
            self.dropped += excess

    def text(self):
        out = self.head.decode("utf-8", "replace")
        if self.dropped:
            out += f"\n[... {self.dropped} bytes of output dropped ...]\n"
        return out + self.tail.decode("utf-8", "replace")


class Session:
    """One trajectory's Python process: `run(code)` calls share state until a crash or timeout.

    timeout: wall-clock seconds per call; memory_mb: address-space limit of each process;
    cpu_seconds: CPU time per call (default: the timeout); max_output: bytes kept of stdout and
    of stderr each per call; max_file_mb: largest file the code may write, and the size of its
    private tmpfs; max_processes: processes and threads the session may have at once;
    isolate: "auto", "namespaces" or "process" (see the module docstring).
    """

    def __init__(self, timeout=5.0, memory_mb=2048, cpu_seconds=None, max_output=8192,
                 max_file_mb=16, max_processes=64, isolate="auto"):  # fmt: skip
        self.timeout = timeout
        self.max_output = max_output
        self.mode = isolation() if isolate == "auto" else isolate
        self.slot = next(_slots) % 1000
        self.limits = {
            "memory_mb": memory_mb,
            "cpu_seconds": cpu_seconds or int(timeout + 0.999) + 1,  # the wall clock fires first
            "max_file_mb": max_file_mb,
            "max_processes": max_processes,
            "uid": _UID_BASE + (os.getpid() % 100_000) * 1000 + self.slot,
        }
        # Every process of the session inherits this tag; tests find survivors by it.
        self.tag = f"{os.getpid()}-{self.slot}-{os.urandom(4).hex()}"
        self.proc = None
        self.workdir = None
        self.lost_note = None  # why the previous worker ended, told to the next call

    # ---------------------------------------------------------------- worker lifecycle

    def _start(self):
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        config = dict(self.limits, cmd_fd=cmd_r, res_fd=res_w, mode=self.mode)
        if self.mode == "process":
            self.workdir = tempfile.mkdtemp(prefix="gtpo-sandbox-")
            config["workdir"] = self.workdir
        argv = [sys.executable, "-I", os.path.abspath(__file__), "--worker", json.dumps(config)]
        if self.mode == "namespaces":
            argv = _UNSHARE + argv
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "GTPO_SANDBOX_TAG": self.tag}  # fmt: skip
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, env=env,
                pass_fds=(cmd_r, res_w), start_new_session=True, close_fds=True,
            )  # fmt: skip
        finally:
            for fd in (cmd_r, res_w, out_w, err_w):
                os.close(fd)
        self.cmd_w, self.res_r, self.out_r, self.err_r = cmd_w, res_r, out_r, err_r
        for fd in (res_r, out_r, err_r):
            os.set_blocking(fd, False)
        ready = self._receive(time.monotonic() + 30, _Capped(self.max_output), _Capped(self.max_output))
        if not isinstance(ready, dict) or not ready.get("ready"):
            self._kill()
            raise RuntimeError(f"the sandbox worker did not start ({self.mode} mode): {ready}")

    def _kill(self):
        """Kill the worker's process group (in namespace mode this ends the whole namespace)."""
        if self.proc is None:
            return
        # In namespace mode, kill the namespace's init first: unshare returns only once the kernel
        # has killed every process in the namespace, so nothing outlives close().
        if self.mode == "namespaces":
            with contextlib.suppress(OSError, ValueError, subprocess.TimeoutExpired):
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    for pid in f.read().split():
                        os.kill(int(pid), signal.SIGKILL)
                self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for fd in (self.cmd_w, self.res_r, self.out_r, self.err_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.proc = None
        if self.workdir:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def close(self):
        """End the worker and everything it started; remove its files. Safe to call twice."""
        self._kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    # ---------------------------------------------------------------- one call

    def run(self, code):
        """Run `code` in this session; never raises for anything the code does. Returns a Result."""
        start = time.monotonic()
        lost_note, self.lost_note = self.lost_note, None
        state_lost = lost_note is not None
        notes = []
        if self.proc is None:
            try:
                self._start()
            except Exception as e:  # the sandbox's own failure, not the code's
                self._kill()
                return Result(False, "", f"sandbox failure: {e}", infra_error=True,
                              duration=time.monotonic() - start, state_lost=state_lost)  # fmt: skip
        out, err = _Capped(self.max_output), _Capped(self.max_output)
        payload = json.dumps({"code": code}).encode()
        try:
            os.write(self.cmd_w, _HEADER.pack(len(payload)) + payload)
        except OSError:  # the worker died between calls (a thread or child of the code killed it)
            pass
        reply = self._receive(start + self.timeout, out, err)
        if reply == "timeout":
            self._kill()
            self.lost_note = (
                f"note: the previous call timed out after {self.timeout:g} s; "
                "the session restarted and its state was lost"
            )
            notes.append(f"TimeoutError: the call did not finish within {self.timeout:g} s and was killed")
            ok, limit, timed_out = False, "time", True
        elif isinstance(reply, dict):
            ok, limit, timed_out = reply["ok"], reply.get("limit"), False
        else:  # the worker died or garbled the protocol: the code's doing (os._exit, a segfault, ...)
            status = self._exit_status()
            self._kill()
            limit = "cpu" if status in (-signal.SIGXCPU, 128 + signal.SIGXCPU) else None
            self.lost_note = (
                f"note: the previous call ended its session ({status_text(status)}); state was lost"
            )
            notes.append(f"the Python process ended during the call: {status_text(status)}")
            ok, timed_out = False, False
        stderr = "".join(f"{n}\n" for n in [lost_note, err.text().rstrip("\n"), *notes] if n)
        return Result(ok, out.text(), stderr, timed_out=timed_out, limit=limit,
                      duration=time.monotonic() - start, state_lost=state_lost,
                      truncated=bool(out.dropped or err.dropped))  # fmt: skip

    def _exit_status(self):
        try:
            return self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None

    def _receive(self, deadline, out, err):
        """Drain stdout and stderr until one protocol message arrives: the decoded message,
        "timeout", or "eof" (the worker closed its answer pipe: it died)."""
        buffer = bytearray()
        streams = {self.out_r: out, self.err_r: err}
        while True:
            if len(buffer) >= _HEADER.size:
                (n,) = _HEADER.unpack_from(buffer)
                if len(buffer) >= _HEADER.size + n:
                    self._drain(streams)  # the code's last output was written before the answer
                    try:
                        return json.loads(buffer[_HEADER.size : _HEADER.size + n])
                    except ValueError:
                        return "garbled"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._drain(streams)
                return "timeout"
            readable, _, _ = select.select([self.res_r, *streams], [], [], remaining)
            for fd in readable:
                data = _read(fd)
                if fd == self.res_r:
                    if not data:
                        self._drain(streams)
                        return "eof"
                    buffer += data
                elif data:
                    streams[fd].add(data)

    def _drain(self, streams):
        for fd, capped in streams.items():
            while data := _read(fd):
                capped.add(data)


def _read(fd):
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""
    except OSError:
        return b""


def status_text(status):
    """A worker's exit status in words. In namespace mode its init reports a signal s as 128 + s."""
    if status is None:
        return "it did not exit"
    signum = -status if status < 0 else status - 128 if status > 128 else None
    with contextlib.suppress(ValueError):
        return f"killed by {signal.Signals(signum).name}"
    return f"exit code {status}"


class Pool:
    """Many sessions at once with at most max_workers calls running concurrently.

    Sessions start lazily, in the pool's threads, on their first call, so start-up overlaps
    too. run(sessions, codes) returns when the slowest call of the batch has returned.
    """

    def __init__(self, max_workers=8, **session_kwargs):
        self.executor = ThreadPoolExecutor(max_workers, thread_name_prefix="sandbox")
        self.session_kwargs = session_kwargs
        self.sessions = []
        self.lock = threading.Lock()

    def session(self):
        """A new session owned by the pool (closed with it)."""
        session = Session(**self.session_kwargs)
        with self.lock:
            self.sessions.append(session)
        return session

    def run(self, sessions, codes):
        """Run codes[i] in sessions[i] concurrently; returns the Results in order."""
        assert len(sessions) == len(codes), f"{len(sessions)} sessions for {len(codes)} codes"
        return list(self.executor.map(Session.run, sessions, codes))

    def close(self):
        with self.lock:
            sessions, self.sessions = self.sessions, []
        list(self.executor.map(Session.close, sessions))
        self.executor.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ==================================================================== the worker (runs sandboxed)


def _private_mounts(tmpfs_size):
    """Fresh tmpfs mounts over every world-writable scratch directory and over every directory
    that the sandbox uid could not traverse on the way to Python itself (e.g. /root, hiding its
    other contents), with the Python installation, its sys.path and this file bound back."""
    libc = ctypes.CDLL(None, use_errno=True)
    ms_nosuid, ms_nodev, ms_bind, ms_rec = 0x2, 0x4, 0x1000, 0x4000

    def mount(source, target, fstype, flags, data):
        if libc.mount(source.encode(), target.encode(), fstype, flags, data):
            raise OSError(ctypes.get_errno(), f"mount {source} on {target} failed")

    needed = {os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, *sys.path] if os.path.isdir(p)}
    keep = {p for p in needed if not any(p.startswith(q + "/") for q in needed)}
    targets = [p for p in ("/tmp", "/var/tmp", "/run/lock", "/dev/shm") if os.path.isdir(p)]
    for path in sorted(keep):
        parts = path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(2, len(parts))]
        targets += [a for a in ancestors if not os.stat(a).st_mode & 0o001][:1]
    for target in sorted(set(targets), key=len):
        inside = [p for p in sorted(keep) if p.startswith(target + "/")]
        handles = [(p, os.open(p, os.O_PATH)) for p in inside]  # survive the overmount
        mount("tmpfs", target, b"tmpfs", ms_nosuid | ms_nodev, f"size={tmpfs_size},mode=1777".encode())
        for path, fd in handles:
            os.makedirs(path, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, ms_bind | ms_rec, None)
            os.close(fd)


def _reap_orphans_as_init(worker_pid, config):
    """PID 1 of the namespace: reap orphaned processes (zombies would count against the process
    limit) until the worker exits, then exit with its status, which ends the namespace."""
    os.close(config["cmd_fd"])
    os.close(config["res_fd"])  # so the trainer sees end-of-file when the worker dies
    while True:
        pid, status = os.wait()
        if pid == worker_pid:
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _worker_setup(config):
    """Inside the worker, before any code runs: mounts, an init process, limits, then drop root."""
    if config["mode"] == "namespaces":
        _private_mounts(f"{config['max_file_mb'] * 4}m")
        os.makedirs("/tmp/work")
        os.chown("/tmp/work", config["uid"], config["uid"])
        os.chdir("/tmp/work")
        pid = os.fork()
        if pid:
            _reap_orphans_as_init(pid, config)
    else:
        os.chdir(config["workdir"])
    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (config["memory_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (config["max_file_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    session_cpu = 100 * config["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_seconds"], session_cpu))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead
    if config["mode"] == "namespaces":
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])  # per-session uid: RLIMIT_NPROC counts this session only
        resource.setrlimit(resource.RLIMIT_NPROC, (config["max_processes"],) * 2)
    else:
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        cap = (
            config["max_processes"] if hard == resource.RLIM_INFINITY else min(hard, config["max_processes"])
        )
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NPROC, (cap, hard))
    os.environ["HOME"] = os.getcwd()


class _CountingStream:
    """Wraps sys.stdout to know whether the code printed anything (bare-expression echo)."""

    def __init__(self, inner):
        self.inner, self.written = inner, 0

    def write(self, s):
        self.written += len(s)
        return self.inner.write(s)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _limit_of(exc):
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "file_size"
    if isinstance(exc, OSError) and exc.errno == errno.EAGAIN:
        return "processes"
    return None


def _execute(code, namespace, call, worker_pid):
    """Run one cell; returns (ok, limit). A bare last expression is printed if nothing else was.
    A process the cell forked leaves when it reaches the cell's end, quietly: only the worker
    reports and answers."""
    filename = f"<cell {call}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # for tracebacks
    stdout = sys.stdout = _CountingStream(sys.__stdout__)
    try:
        tree = ast.parse(code, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
            if value is not None and stdout.written == 0:
                print(repr(value))
        return True, None
    except SystemExit as e:
        if e.code in (None, 0):
            return True, None
        print(f"SystemExit: {e.code}", file=sys.stderr)
        return False, None
    except BaseException as e:  # noqa: BLE001 - the code's exception is its result
        if os.getpid() != worker_pid:
            sys.__stdout__.flush()
            os._exit(1)
        frames = traceback.extract_tb(e.__traceback__)
        keep = next((i for i, f in enumerate(frames) if f.filename == filename), len(frames))
        tb = e.__traceback__
        for _ in range(keep):
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb, file=sys.stderr)
        return False, _limit_of(e)
    finally:
        for stream in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def _worker_main(config):
    _worker_setup(config)
    cmd, res = config["cmd_fd"], config["res_fd"]

    def send(message):
        data = json.dumps(message).encode()
        os.write(res, _HEADER.pack(len(data)) + data)

    def receive():
        header = _read_exactly(cmd, _HEADER.size)
        return json.loads(_read_exactly(cmd, _HEADER.unpack(header)[0])) if header else None

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    worker_pid = os.getpid()
    send({"ready": True})
    for call in itertools.count(1):
        request = receive()
        if request is None:  # the trainer closed the pipe
            return
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu_used = int(used.ru_utime + used.ru_stime)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        with contextlib.suppress(ValueError):
            resource.setrlimit(resource.RLIMIT_CPU, (min(cpu_used + config["cpu_seconds"], hard), hard))
        ok, limit = _execute(request["code"], namespace, call, worker_pid)
        if os.getpid() != worker_pid:  # a child the code forked got here: it must not answer
            os._exit(0)
        send({"ok": ok, "limit": limit})


def _read_exactly(fd, n):
    data = bytearray()
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(json.loads(sys.argv[2]))

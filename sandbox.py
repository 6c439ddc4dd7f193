"""A contained Python executor whose state persists across the turns of one trajectory.

    with Session(timeout=5.0) as session:
        session.run("x = 6 * 7")
        result = session.run("x")          # result.stdout == "42\\n" (a bare last expression prints)

Mechanism. A session is one long-lived worker process (this file run as `python -I -u sandbox.py
--worker`) that reads code over a pipe, executes it in one persistent namespace, and answers over
a second pipe; the code's stdout and stderr are two more pipes that the trainer drains while it
waits. A warm call costs a pipe round trip and an exec (well under a millisecond); starting a
worker costs a Python start-up (tens of milliseconds), paid once per trajectory rather than per
turn, and a fresh `python -c` per call would also lose the state between turns. Standard library
only.

Containment, and what it does NOT cover. Where the trainer runs as root and `unshare` works
(checked once, `isolation()` tells), the worker starts in new network, PID, mount and IPC
namespaces:
    - Network: the namespace has only a loopback interface, and it is down: no connection to
      anything, not even to listeners on the host's 127.0.0.1 (abstract unix sockets are per
      network namespace; socket files are unreachable, see Files).
    - Processes: the worker's parent is PID 1 of the namespace, a small init that reaps
      orphans; when the worker dies (close, timeout, crash), or the trainer dies (its lifeline
      pipe closes), init exits and the kernel kills every process in the namespace, including
      children that called setsid() or daemonised. The worker runs under a uid leased to its
      session alone (an flock per uid), so RLIMIT_NPROC bounds its processes and threads
      (fork bombs) without touching other sessions or the trainer; no_new_privs is set.
    - Files: the work directory, /tmp, /var/tmp, /run and /dev/shm are private size-limited
      tmpfs mounts that vanish with the namespace, as does any directory the sandbox uid could
      not traverse on the way to Python (/root here: its contents are hidden); with root
      dropped, nothing else is writable (files the host leaves world-writable would be).
    - IPC: System V shared memory, semaphores and queues are private to the namespace.
    - The trainer is invisible: /proc shows the namespace's own processes only.
In every mode: a wall-clock timeout per call, also on sending the code (the worker and all it
spawned are killed; the next call starts a fresh session and its result says the state was
lost); RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (file size), RLIMIT_NOFILE and no core
dumps; an environment with nothing inherited (no secrets; only PATH, HOME, LANG and
thread-count settings); stdin is /dev/null; stdout and stderr are drained while the code runs
and truncated to max_output bytes each, head and tail kept; output written between calls is
dropped with a note, not blamed on the next call; answers on the protocol pipe are checked
(shape, and at most 64 KiB), so forged ones count as the code breaking its session.
NOT covered: the limits are per process, not per session (n processes may use n times
memory_mb; a process that outlives its call keeps using CPU until the session closes, and
each fork starts a fresh RLIMIT_CPU count); a cgroup per session is what bounds these.
Fallback, where namespaces are not available (not root, or no `unshare`): the same rlimits on
an ordinary process group in a private temporary directory removed on close, BUT the code runs
as the trainer's user (it can signal or kill the trainer, and read what that user can read),
without network isolation, with RLIMIT_NPROC counted against the whole user (and ignored for
root), with /tmp shared, and with children that call setsid() or setpgid() able to outlive the
session. Use a container or VM there.
This is not a security boundary against a determined attacker (kernel exploits, side channels,
reading world-readable files, setuid programs on the host): for untrusted models at scale, run
the trainer's sandboxes inside a container or VM (gVisor, Firecracker) as well.

Failures are attributed. Result.infra_error is True only when the sandbox itself failed (the
worker could not start or answer its start-up handshake); training leaves those trajectories
out of group statistics. Everything the code can cause, including killing or corrupting its
own worker, is the code's fault, so hostile code cannot turn a bad score into an excluded one.
"""

import ast
import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import linecache
import os
import resource
import select
import shutil
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
_UID_BASE = 1_000_000  # sandbox uids are _UID_BASE .. _UID_BASE + _UID_COUNT - 1
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


_UNSHARE = ["unshare", "--net", "--pid", "--mount", "--ipc", "--fork", "--kill-child", "--mount-proc"]


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
    cpu_seconds: CPU time per call and process (default: the timeout + 1 s, so the wall clock
    fires first); max_output: bytes kept of stdout and of stderr each per call; max_file_mb:
    largest file the code may write (its tmpfs mounts hold 4x that); max_processes: processes
    and threads the session may have at once; isolate: "auto", "namespaces" or "process".
    run() and close() of one session never interleave; different sessions run concurrently.
    """

    def __init__(self, timeout=5.0, memory_mb=2048, cpu_seconds=None, max_output=8192,
                 max_file_mb=16, max_processes=64, isolate="auto"):  # fmt: skip
        self.timeout = timeout
        self.max_output = max_output
        self.mode = isolation() if isolate == "auto" else isolate
        self.limits = {
            "memory_mb": memory_mb,
            "cpu_seconds": cpu_seconds or int(timeout + 0.999) + 1,
            "max_file_mb": max_file_mb,
            "max_processes": max_processes,
        }
        # Every process of the session inherits this tag; tests find survivors by it.
        self.tag = f"{os.getpid()}-{next(_sessions)}-{os.urandom(4).hex()}"
        self.lock = threading.Lock()
        self.proc = None
        self.fds = {}  # the trainer's ends of the pipes: cmd, res, out, err, life
        self.workdir = None
        self.uid_lease = None  # (uid, locked fd) in namespace mode
        self.lost_note = None  # why the previous worker ended, told to the next call

    # ---------------------------------------------------------------- worker lifecycle

    def _start(self):
        if self.mode == "namespaces" and self.uid_lease is None:
            self.uid_lease = _lease_uid()
        pipes = {name: os.pipe() for name in ("cmd", "res", "out", "err", "life")}
        child_ends = {"cmd": pipes["cmd"][0], "res": pipes["res"][1], "life": pipes["life"][0]}
        config = dict(self.limits, mode=self.mode, uid=self.uid_lease[0] if self.uid_lease else None,
                      **{f"{k}_fd": fd for k, fd in child_ends.items()})  # fmt: skip
        if self.mode == "process":
            self.workdir = config["workdir"] = tempfile.mkdtemp(prefix="gtpo-sandbox-")
        argv = [sys.executable, "-I", "-u", os.path.abspath(__file__), "--worker", json.dumps(config)]
        if self.mode == "namespaces":
            argv = _UNSHARE + argv
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "MALLOC_ARENA_MAX": "2", "GTPO_SANDBOX_TAG": self.tag}  # fmt: skip
        self.fds = {"cmd": pipes["cmd"][1], "res": pipes["res"][0], "out": pipes["out"][0],
                    "err": pipes["err"][0], "life": pipes["life"][1]}  # fmt: skip
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=pipes["out"][1], stderr=pipes["err"][1], env=env,
                pass_fds=tuple(child_ends.values()), start_new_session=True, close_fds=True,
            )  # fmt: skip
        finally:
            for fd in (*child_ends.values(), pipes["out"][1], pipes["err"][1]):
                os.close(fd)
        for fd in self.fds.values():
            os.set_blocking(fd, False)
        ready = self._receive(time.monotonic() + 30, _Capped(self.max_output), _Capped(self.max_output))
        if ready != {"ready": True}:
            raise RuntimeError(f"the sandbox worker did not start ({self.mode} mode): {ready}")

    def _kill(self):
        """End the worker and everything it started; release its pipes and files."""
        if self.proc is not None:
            # In namespace mode, kill the namespace's init first: unshare returns only once the
            # kernel has killed every process in the namespace, so nothing outlives close().
            if self.mode == "namespaces":
                with contextlib.suppress(OSError, ValueError, subprocess.TimeoutExpired):
                    with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                        children = [int(pid) for pid in f.read().split()]
                    for pid in children:
                        os.kill(pid, signal.SIGKILL)
                    if children:
                        self.proc.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def close(self):
        """End the worker and everything it started; remove its files. Safe to call twice."""
        with self.lock:
            self._kill()
            if self.uid_lease:
                os.close(self.uid_lease[1])
                self.uid_lease = None

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
        with self.lock:
            return self._run(code)

    def reset(self):
        """Forget the session's variables and number cells from 1 again, as in a new session, but
        in the same warm process (files it wrote and modules it imported stay). For building
        many short trajectories (SFT data) without a cold start each. Returns a Result."""
        with self.lock:
            return self._run(None)

    def start(self):
        """Start the worker now rather than at the first call (a failure is reported by run)."""
        with self.lock:
            if self.proc is None:
                try:
                    self._start()
                except Exception:  # noqa: BLE001 - run() retries and reports it as infra_error
                    self._kill()

    def _run(self, code):
        start = time.monotonic()
        lost_note, self.lost_note = self.lost_note, None
        notes = []
        if self.proc is None:
            try:
                self._start()
            except Exception as e:  # the sandbox's own failure, not the code's
                self._kill()
                elapsed = time.monotonic() - start
                return Result(False, "", f"sandbox failure: {e}\n", infra_error=True, duration=elapsed,
                              state_lost=lost_note is not None)  # fmt: skip
        stale = _Capped(0)
        self._drain({self.fds["out"]: stale, self.fds["err"]: stale})
        if stale.dropped:
            notes.append(f"note: {stale.dropped} bytes written after the previous call returned were dropped")
        out, err = _Capped(self.max_output), _Capped(self.max_output)
        request = {"reset": True} if code is None else {"code": code}
        payload = json.dumps(request).encode("utf-8", "surrogatepass")
        deadline = start + self.timeout
        sent = _write_all(self.fds["cmd"], _HEADER.pack(len(payload)) + payload, deadline)
        reply = self._receive(deadline, out, err) if sent else "timeout"
        if reply == "timeout":
            self._kill()
            self.lost_note = (
                f"note: the previous call timed out after {self.timeout:g} s; "
                "the session restarted and its state was lost"
            )
            notes.append(f"TimeoutError: the call did not finish within {self.timeout:g} s and was killed")
            ok, limit, timed_out = False, "time", True
        elif _is_answer(reply):
            ok, limit, timed_out = reply["ok"], reply["limit"], False
        else:  # the worker died or garbled the protocol: the code's doing (os._exit, a segfault, ...)
            status = self._exit_status()
            self._kill()
            limit = "cpu" if status in (-signal.SIGXCPU, 128 + signal.SIGXCPU) else None
            what = status_text(status) if status is not None else "it broke the sandbox's protocol"
            self.lost_note = f"note: the previous call ended its session ({what}); state was lost"
            notes.append(f"the Python process ended during the call: {what}")
            ok, timed_out = False, False
        stderr = "".join(f"{n}\n" for n in [lost_note, err.text().rstrip("\n"), *notes] if n)
        return Result(ok, out.text(), stderr, timed_out=timed_out, limit=limit,
                      duration=time.monotonic() - start, state_lost=lost_note is not None,
                      truncated=bool(out.dropped or err.dropped))  # fmt: skip

    def _exit_status(self):
        if self.proc.poll() is None:
            try:
                return self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                return None
        return self.proc.returncode

    def _receive(self, deadline, out, err):
        """Drain stdout and stderr until one protocol message arrives: the decoded message,
        "timeout", "eof" (the worker closed its answer pipe: it died) or "garbled"."""
        buffer = bytearray()
        streams = {self.fds["out"]: out, self.fds["err"]: err}
        poller = select.poll()
        for fd in (self.fds["res"], *streams):
            poller.register(fd, select.POLLIN)
        while True:
            if len(buffer) >= _HEADER.size:
                (n,) = _HEADER.unpack_from(buffer)
                if n > _MAX_MESSAGE:
                    return "garbled"
                if len(buffer) >= _HEADER.size + n:
                    self._drain(streams)  # the code's last output was written before the answer
                    try:
                        return json.loads(buffer[_HEADER.size : _HEADER.size + n])
                    except Exception:  # noqa: BLE001 - any undecodable answer is garbled
                        return "garbled"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._drain(streams)
                return "timeout"
            for fd, _ in poller.poll(max(1, int(remaining * 1000))):
                data = _read(fd)
                if fd == self.fds["res"]:
                    if not data:
                        self._drain(streams)
                        return "eof"
                    buffer += data
                elif data:
                    streams[fd].add(data)
                else:
                    poller.unregister(fd)  # that stream's writers are all gone

    def _drain(self, streams):
        for fd, capped in streams.items():
            while data := _read(fd):
                capped.add(data)


_MAX_MESSAGE = 1 << 16  # an answer is a few bytes; anything longer is forged
_UID_COUNT = 100_000
_sessions = itertools.count()


def _is_answer(reply):
    """The worker's answer has exactly this shape; anything else counts as garbled."""
    return (
        isinstance(reply, dict)
        and isinstance(reply.get("ok"), bool)
        and reply.get("limit") in (None, "memory", "file_size", "processes")
    )


def _lease_uid():
    """(uid, fd): a uid no other live session on this machine holds, leased by an flock that
    the kernel releases if the trainer dies, so RLIMIT_NPROC counts one session only."""
    directory = os.path.join(tempfile.gettempdir(), "gtpo-sandbox-uids")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    offset = int.from_bytes(os.urandom(4), "little")
    for k in range(_UID_COUNT):
        uid = _UID_BASE + (offset + k) % _UID_COUNT
        fd = os.open(os.path.join(directory, str(uid)), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return uid, fd
        except BlockingIOError:
            os.close(fd)
    raise RuntimeError(f"all {_UID_COUNT} sandbox uids are in use")


def _write_all(fd, data, deadline):
    """Write to a non-blocking pipe before the deadline; False if it did not all go in time.
    A closed reader (the worker died) is not an error here: the answer pipe will say so."""
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if not poller.poll(max(1, int(remaining * 1000))):
            continue
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue
        except OSError:  # broken pipe
            return True
    return True


def _read(fd):
    try:
        return os.read(fd, 1 << 16)
    except OSError:  # would block, or closed
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

    session(start=True) starts a worker in the pool's threads so it is warm by its first call;
    prewarm(n) starts n spare workers ahead of time (e.g. while the trainer updates the policy),
    which session() hands out first. run(sessions, codes) returns when the slowest call has.
    """

    def __init__(self, max_workers=8, **session_kwargs):
        self.executor = ThreadPoolExecutor(max_workers, thread_name_prefix="sandbox")
        self.session_kwargs = session_kwargs
        self.sessions = []
        self.spares = []  # (session, future of its start)
        self.lock = threading.Lock()

    def session(self, start=False):
        """A session owned by the pool (closed with it): a prewarmed spare if there is one."""
        with self.lock:
            if self.spares:
                return self.spares.pop()[0]
            session = Session(**self.session_kwargs)
            self.sessions.append(session)
        if start:
            self.executor.submit(session.start)
        return session

    def prewarm(self, n, wait=False):
        """Start n spare workers in the background (wait=True: return once they are up)."""
        with self.lock:
            fresh = [Session(**self.session_kwargs) for _ in range(n)]
            self.sessions += fresh
            started = [(s, self.executor.submit(s.start)) for s in fresh]
            self.spares += started
        if wait:
            for _, future in started:
                future.result()

    def run(self, sessions, codes):
        """Run codes[i] in sessions[i] concurrently; returns the Results in order."""
        assert len(sessions) == len(codes), f"{len(sessions)} sessions for {len(codes)} codes"
        return list(self.executor.map(Session.run, sessions, codes))

    def close(self):
        """Wait for calls in flight, then close every session of the pool."""
        self.executor.shutdown(wait=True)
        with self.lock:
            sessions, self.sessions = self.sessions, []
        for session in sessions:
            session.close()

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
    targets = [p for p in ("/tmp", "/var/tmp", "/run", "/dev/shm") if os.path.isdir(p)]
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
    limit) until the worker exits, then exit with its status, which ends the namespace. Also
    exit when the trainer's end of the lifeline closes: a trainer that dies takes its sandboxes."""
    os.close(config["cmd_fd"])
    os.close(config["res_fd"])  # so the trainer sees end-of-file when the worker dies
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                os._exit(1)
            if pid == 0:
                break
            if pid == worker_pid:
                os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
        readable, _, _ = select.select([config["life_fd"], wake_r], [], [], 1.0)
        if config["life_fd"] in readable:
            os._exit(1)
        with contextlib.suppress(OSError):
            os.read(wake_r, 4096)


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
    os.close(config["life_fd"])
    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (config["memory_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (config["max_file_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    session_cpu = 100 * config["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_seconds"], session_cpu))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid programs cannot raise privileges
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
    call = 0
    while True:
        request = receive()
        if request is None:  # the trainer closed the pipe: leave now, threads and all
            os._exit(0)
        if request.get("reset"):  # a fresh namespace, numbered from cell 1 again
            namespace, call = {"__name__": "__main__", "__builtins__": __builtins__}, 0
            send({"ok": True, "limit": None})
            continue
        call += 1
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

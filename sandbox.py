"""A contained Python executor whose state persists across the turns of one trajectory.

    with Session(timeout=5.0) as session:
        session.run("x = 6 * 7")
        result = session.run("x")          # result.stdout == "42\\n" (a bare last expression prints)

Mechanism. A session is one long-lived worker process that reads code over a pipe, executes it
in one persistent namespace, and answers over a second pipe; the code's stdout and stderr are two
more pipes that the trainer drains while it waits. A warm call costs a pipe round trip and an
exec (well under a millisecond). Workers are not started as new Pythons: a template process
(sandbox_worker.py, started once per trainer process and isolation mode, see Template) has
imported what a worker needs and forks one per session, which then enters its own namespaces,
uid, limits and directory; a session starts, answers a first call and closes in about 5 ms
instead of about 45 (docs/results.md). The template never runs submitted code, so nothing of one
session reaches the next. A fresh `python -c` per call would also lose the state between turns.
Standard library only.

Containment, and what it does NOT cover. Where the trainer runs as root and the kernel lets it
make namespaces (checked once, `isolation()` tells), the worker starts in new network, PID,
mount and IPC namespaces:
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
Fallback, where namespaces are not available (not root, or the kernel refuses): the same rlimits
on an ordinary process group in a private temporary directory removed on close, BUT the code runs
as the trainer's user (it can signal or kill the trainer, or the template, which makes sessions
starting at that moment infrastructure errors; and read what that user can read),
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

import atexit
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

_HEADER = struct.Struct("!I")  # length prefix of every protocol message (as in sandbox_worker.py)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_worker.py")  # runs sandboxed
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
    """'namespaces' if workers can get their own network, PID, mount and IPC namespaces, else 'process'."""
    global _isolation
    if _isolation is None:
        _isolation = "process"
        if os.geteuid() == 0:
            probe = subprocess.run(
                [sys.executable, "-I", WORKER, "--probe"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10
            )
            if probe.returncode == 0:
                _isolation = "namespaces"
    return _isolation


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

    def __init__(
        self,
        timeout=5.0,
        memory_mb=2048,
        cpu_seconds=None,
        max_output=8192,
        max_file_mb=16,
        max_processes=64,
        isolate="auto",
        template=None,
    ):
        self.timeout = timeout
        self.max_output = max_output
        self.mode = isolation() if isolate == "auto" else isolate
        self.template = template  # None: the process-wide one for this mode (see Template)
        if template is not None and template.mode != self.mode:
            raise ValueError(f"a {template.mode!r} template cannot start {self.mode!r} sessions")
        self.limits = {
            "memory_mb": memory_mb,
            "cpu_seconds": cpu_seconds or int(timeout + 0.999) + 1,
            "max_file_mb": max_file_mb,
            "max_processes": max_processes,
        }
        self.lock = threading.Lock()
        self.proc = None  # the live worker (namespace mode: the namespace's init), a _Process
        self.fds = {}  # the trainer's ends of the pipes: cmd, res, out, err, life, status
        self.workdir = None
        self.uid_lease = None  # (uid, locked fd) in namespace mode
        self.pid_namespaces = []  # e.g. ["pid:[4026532301]"]: each worker's processes all stay in it
        self.lost_note = None  # why the previous worker ended, told to the next call
        self.unkilled = False  # a worker outlived SIGKILL by 10 s (a process stuck in the kernel)

    # ---------------------------------------------------------------- worker lifecycle

    def _start(self):
        if self.mode == "namespaces" and self.uid_lease is None:
            self.uid_lease = _lease_uid()
        pipes = {name: os.pipe() for name in WORKER_END}
        child_ends = [pipes[name][end] for name, end in WORKER_END.items()]  # in the worker's order
        config = dict(self.limits, mode=self.mode, uid=self.uid_lease[0] if self.uid_lease else None)
        if self.mode == "process":
            self.workdir = config["workdir"] = tempfile.mkdtemp(prefix="gtpo-sandbox-")
        self.fds = {name: pipes[name][1 - end] for name, end in WORKER_END.items()}  # the other ends
        try:
            template = self.template or _shared_template(self.mode)
            self.proc = template.spawn(config, child_ends)
        finally:
            for fd in child_ends:
                os.close(fd)
        for fd in self.fds.values():
            os.set_blocking(fd, False)
        if self.mode == "namespaces":
            with contextlib.suppress(OSError):  # a worker that already died fails the handshake below
                self.pid_namespaces.append(os.readlink(f"/proc/{self.proc.pid}/ns/pid"))
        ready = self._receive(time.monotonic() + 30, _Capped(self.max_output), _Capped(self.max_output))
        if ready != {"ready": True}:
            raise RuntimeError(f"the sandbox worker did not start ({self.mode} mode): {ready}")

    def _kill(self):
        """End the worker and everything it started; release its pipes and files."""
        if self.proc is not None:
            # Namespace mode: killing the namespace's init makes the kernel kill every process in
            # it, and init is reported dead only once they all are, so nothing outlives close().
            # Process mode: the template kills the worker's process group as it reaps the worker.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.proc.pidfd, signal.SIGKILL)
            dead = _wait_readable(self.proc.pidfd, 10.0)  # a pidfd is readable once its process exited
            if self.mode == "process":  # the template has reaped it and killed its group (data, or EOF)
                _wait_readable(self.fds["status"], 5.0)
            self.unkilled = self.unkilled or not dead
            os.close(self.proc.pidfd)
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
            if self.uid_lease and not self.unkilled:  # a uid whose processes may live is kept leased
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
                elapsed, lost = time.monotonic() - start, lost_note is not None
                return Result(False, "", f"sandbox failure: {e}\n", infra_error=True, duration=elapsed, state_lost=lost)
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
        duration, lost, cut = time.monotonic() - start, lost_note is not None, bool(out.dropped or err.dropped)
        return Result(
            ok, out.text(), stderr, timed_out=timed_out, limit=limit, duration=duration, state_lost=lost, truncated=cut
        )

    def _exit_status(self):
        """The worker's exit status as its template reported it, or None if none came within 1 s."""
        if _wait_readable(self.fds["status"], 1.0):
            with contextlib.suppress(ValueError):
                return int(_read(self.fds["status"]))
        return None

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


def _wait_readable(fd, seconds):
    """True once fd is readable or its writers are gone; False after `seconds`."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(seconds * 1000)))


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

    prewarm(n) starts n spare workers ahead of time (e.g. while the trainer updates the policy),
    which session() hands out first. run(sessions, codes) returns when the slowest call has.
    """

    def __init__(self, max_workers=8, **session_kwargs):
        self.executor = ThreadPoolExecutor(max_workers, thread_name_prefix="sandbox")
        self.session_kwargs = session_kwargs
        self.sessions = []
        self.spares = []  # (session, future of its start)
        self.lock = threading.Lock()

    def session(self):
        """A session owned by the pool (closed with it): a prewarmed spare if there is one, else a
        new one that starts at its first call."""
        with self.lock:
            if self.spares:
                return self.spares.pop()[0]
            session = Session(**self.session_kwargs)
            self.sessions.append(session)
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


@dataclass
class _Process:
    """A session's process as the trainer holds it: pid, and a pidfd that signals it race-free."""

    pid: int
    pidfd: int


class Template:
    """A pre-started Python process that forks each new session's worker.

    It is `python -I -u sandbox_worker.py --template MODE FD`: it has imported everything a worker
    needs, so a session starts with a fork (about a millisecond) instead of a Python start-up.
    It never runs submitted code: each fork enters its own namespaces, uid, limits and directory
    exactly as a freshly started worker would, so nothing of one session reaches the next. It
    reaps the workers it forks and reports each one's exit status on that session's status pipe,
    and exits when the trainer closes it or dies (its socket closes). One is shared per process
    and mode (`Session(template=None)`); pass your own to give a pool its own.
    """

    def __init__(self, mode):
        self.mode = mode
        self.lock = threading.Lock()  # one spawn request at a time on the socket
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-I", "-u", WORKER, "--template", mode, str(theirs.fileno())]
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, env=_WORKER_ENV, pass_fds=(theirs.fileno(),), start_new_session=True
            )
        finally:
            theirs.close()
        self.socket = ours
        self.socket.settimeout(30)
        try:
            if self.socket.recv(16) != b"ready":
                raise RuntimeError(f"the sandbox template did not start: {argv}")
        except BaseException:
            self.close()
            raise

    def spawn(self, config, fds):
        """Fork a worker with these pipe ends: [cmd, res, out, err, life, status]. A _Process."""
        with self.lock:
            try:
                socket.send_fds(self.socket, [json.dumps(config).encode()], fds)
                message, pidfds, _, _ = socket.recv_fds(self.socket, 1 << 16, 1)
            except BaseException:  # a late reply would answer the next request: this template is done
                self.close()
                raise
        for fd in pidfds:
            os.set_inheritable(fd, False)  # received fds are inheritable; nothing we fork needs it
        if not message:
            raise RuntimeError("the sandbox template has exited")
        reply = json.loads(message)
        if "error" in reply:
            raise RuntimeError(f"the sandbox template could not fork a worker: {reply['error']}")
        return _Process(reply["pid"], pidfds[0])

    def alive(self):
        return self.proc.poll() is None

    def close(self):
        """Stop the template (live sessions are not affected; they end with their own close)."""
        self.socket.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# The pipes between the trainer and a worker, and which end (os.pipe: 0 reads, 1 writes) the worker
# holds: it reads commands (cmd) and the trainer's lifeline (life), and writes results, output and
# its exit status. The worker receives its ends in this order.
WORKER_END = {"cmd": 0, "res": 1, "out": 1, "err": 1, "life": 0, "status": 1}

_WORKER_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/tmp",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
}  # all a worker inherits: no secrets
_templates = {}  # (mode, interpreter) -> the Template sessions share
_templates_lock = threading.Lock()


def _shared_template(mode):
    """This process's template for `mode`, started at first use and again if it died."""
    with _templates_lock:
        key = (mode, sys.executable)
        if key not in _templates or not _templates[key].alive():
            if key in _templates:
                _templates.pop(key).close()
            _templates[key] = Template(mode)
        return _templates[key]


@atexit.register
def _close_templates():
    with _templates_lock:
        for template in _templates.values():
            template.close()
        _templates.clear()

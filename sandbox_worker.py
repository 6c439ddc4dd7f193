"""The part of the sandbox that runs outside the trainer: the template and each session's worker.

sandbox.py (the trainer's side) starts this file once per process and isolation mode as
`python -I -u sandbox_worker.py --template MODE FD`: the template. It forks one worker per
session; the worker enters its namespaces, limits and uid (_worker_setup), then runs cells sent
over its pipe in one namespace (_worker_main). Nothing imports this file, and it imports only
what a worker needs: every module here is in the memory each fork copies, so it stays lean.
Standard library only.
"""

import ast
import contextlib
import ctypes
import errno
import gc
import json
import linecache
import os
import resource
import select
import signal
import socket
import struct
import sys
import traceback

_HEADER = struct.Struct("!I")  # length prefix of every protocol message (as in sandbox.py)

_LIBC = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = 0x20000, 0x8000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000


def _libc(name, *args):
    """Call a libc function that returns 0 on success; raise OSError naming it otherwise."""
    if getattr(_LIBC, name)(*args):
        errno_ = ctypes.get_errno()
        raise OSError(errno_, f"{name}{args}: {os.strerror(errno_)}")


def _new_pid_namespace_for_children(own_pid_namespace):
    """Make the next fork PID 1 of a new PID namespace. setns back to our own first: a process
    may unshare a PID namespace for its children only while they would be in its own."""
    _libc("setns", own_pid_namespace, _CLONE_NEWPID)
    _libc("unshare", _CLONE_NEWPID)


def _enter_namespaces():
    """In PID 1 of a new PID namespace: new network, mount and IPC namespaces, mounts that do not
    propagate to the host, and a /proc that shows this PID namespace only."""
    _libc("unshare", _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWIPC)
    _libc("mount", b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)
    _libc("mount", b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)


def _mount_plan():
    """[(directory, [paths inside it to bind back])]: a fresh tmpfs goes over every world-writable
    scratch directory and over every directory that the sandbox uid could not traverse on the way
    to Python itself (e.g. /root, hiding its other contents); the Python installation, its
    sys.path and this file are bound back. The same for every worker: the template makes it once."""
    needed = {os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, *sys.path] if os.path.isdir(p)}
    keep = {p for p in needed if not any(p.startswith(q + "/") for q in needed)}
    targets = [p for p in ("/tmp", "/var/tmp", "/run", "/dev/shm") if os.path.isdir(p)]
    for path in sorted(keep):
        parts = path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(2, len(parts))]
        targets += [a for a in ancestors if not os.stat(a).st_mode & 0o001][:1]
    return [(t, [p for p in sorted(keep) if p.startswith(t + "/")]) for t in sorted(set(targets), key=len)]


def _private_mounts(plan, tmpfs_size):
    """Carry out _mount_plan() in the worker's own mount namespace."""
    for target, inside in plan:
        handles = [(p, os.open(p, os.O_PATH)) for p in inside]  # survive the overmount
        _libc(
            "mount",
            b"tmpfs",
            target.encode(),
            b"tmpfs",
            _MS_NOSUID | _MS_NODEV,
            f"size={tmpfs_size},mode=1777".encode(),
        )
        for path, fd in handles:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _libc("mount", f"/proc/self/fd/{fd}".encode(), path.encode(), None, _MS_BIND | _MS_REC, None)
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
    poller = select.poll()  # not select(): the fds may be numbered above 1023
    for fd in (config["life_fd"], wake_r):
        poller.register(fd, select.POLLIN)
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
        if any(fd == config["life_fd"] for fd, _ in poller.poll(1000)):
            os._exit(1)
        with contextlib.suppress(OSError):
            os.read(wake_r, 4096)


def _worker_setup(config):
    """Inside the worker, before any code runs: mounts, an init process, limits, then drop root."""
    if config["mode"] == "namespaces":
        _enter_namespaces()
        _private_mounts(config["mount_plan"], f"{config['max_file_mb'] * 4}m")
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
    _LIBC.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid programs cannot raise privileges
    if config["mode"] == "namespaces":
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])  # per-session uid: RLIMIT_NPROC counts this session only
        resource.setrlimit(resource.RLIMIT_NPROC, (config["max_processes"],) * 2)
    else:
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        cap = config["max_processes"] if hard == resource.RLIM_INFINITY else min(hard, config["max_processes"])
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


def _template_main(mode, control_fd):
    """The template process: fork a worker per request on the control socket, reap them, and
    write each one's exit status to its session's status pipe. Exits when the socket closes."""
    control = socket.socket(fileno=control_fd)
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY) if mode == "namespaces" else None
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a status pipe per live session
    status_fds = {}  # worker pid -> the write end of its session's status pipe
    mount_plan = _mount_plan() if mode == "namespaces" else None
    _execute("x = 1", {}, 0, os.getpid())  # lazy first-use work done once here, not in every worker
    gc.freeze()  # a worker's garbage collections then leave the template's objects (and pages) alone
    control.send(b"ready")
    while True:
        readable, _, _ = select.select([control, wake_r], [], [])
        if control in readable:
            message, fds, _, _ = socket.recv_fds(control, 1 << 16, 6)
            if not message:
                os._exit(0)
            try:
                if own_pid_namespace is not None:
                    _new_pid_namespace_for_children(own_pid_namespace)
                pid = os.fork()
            except OSError as e:
                for fd in fds:
                    os.close(fd)
                control.send(json.dumps({"error": str(e)}).encode())
                continue
            if pid == 0:
                held = [*fds, *status_fds.values(), control.fileno(), wake_r, wake_w, own_pid_namespace or 0]
                _forked_worker(dict(json.loads(message), mount_plan=mount_plan), fds, highest=max(held))
            pidfd = os.pidfd_open(pid)
            socket.send_fds(control, [json.dumps({"pid": pid}).encode()], [pidfd])
            os.close(pidfd)
            for fd in fds[:-1]:
                os.close(fd)
            status_fds[pid] = fds[-1]
        with contextlib.suppress(OSError):
            os.read(wake_r, 4096)
        while status_fds and (exited := os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)):
            if mode == "process":  # the worker's group, while its unreaped leader keeps the number in use
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(exited.si_pid, signal.SIGKILL)
            _, status = os.waitpid(exited.si_pid, 0)
            with contextlib.suppress(OSError):  # the session may be gone already
                os.write(status_fds[exited.si_pid], str(os.waitstatus_to_exitcode(status)).encode())
            os.close(status_fds.pop(exited.si_pid))


def _forked_worker(config, fds, highest):
    """In the template's child: keep only this session's pipe ends (stdout and stderr on 1 and 2;
    `highest` is the template's highest fd), forget the template's signal handling, and become
    the worker. Never returns."""
    try:
        cmd, res, out, err, life, _status = fds
        os.dup2(out, 1)
        os.dup2(err, 2)
        keep = sorted({2, cmd, res, life})  # and 0, 1
        for low, high in zip(keep, [*keep[1:], highest + 1]):  # up to the template's highest fd only
            os.closerange(low + 1, high)  # the template's socket and every other session's status pipe
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        config.update(cmd_fd=cmd, res_fd=res, life_fd=life)
        sys.argv = [sys.argv[0], "--worker", json.dumps(config)]  # as the code would see it
        _worker_main(config)
    except BaseException:  # noqa: BLE001 - reported on the session's stderr; the trainer sees it die
        traceback.print_exc()
    os._exit(70)


def _probe():
    """Exit 0 if a worker can enter its namespaces here (what isolation() checks)."""
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY)
    _new_pid_namespace_for_children(own_pid_namespace)
    pid = os.fork()
    if pid == 0:
        try:
            _enter_namespaces()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))


if __name__ == "__main__" and sys.argv[1:2] == ["--template"]:
    _template_main(sys.argv[2], int(sys.argv[3]))
elif __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    _probe()

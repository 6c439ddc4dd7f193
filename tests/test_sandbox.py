"""Properties of sandbox.py: containment against hostile code, state across turns, concurrency.

Every adversarial case is checked for the same four things (test_hostile_code_is_contained) plus
its own expectation: the call returns within timeout + 1 s, the test process (standing in for the
trainer) is untouched, no process of the session survives close(), nothing is written outside
the session's directory, and the next call in a new session works. Network tests only ever
address 127.0.0.1.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

import sandbox

TIMEOUT = 2.0
NAMESPACES = sandbox.isolation() == "namespaces"
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason="needs root and unshare (namespace mode)")


def session_processes(session):
    """PIDs of live (non-zombie) processes in any PID namespace the session's workers have had:
    every process a worker starts stays in its namespace, setsid() and daemonising included."""
    assert session.pid_namespaces, "the session never started a worker in namespace mode"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/pid")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if namespace in session.pid_namespaces and state != "Z":
            found.append(int(pid))
    return found


ESCAPE = "gtpo-escape-{marker}"
HOST_DIRS = ["/tmp", "/var/tmp", "/dev/shm", os.getcwd(), os.path.dirname(sandbox.__file__)]

# (id, code, expectation on the Result). {marker}, {port} and {pid} are filled in per test.
HOSTILE = [
    ("infinite-loop", "while True:\n    pass", lambda r: r.timed_out and r.limit == "time"),
    ("sleep-past-timeout", "import time\ntime.sleep(60)", lambda r: r.timed_out),
    ("fork-bomb", "import os\nwhile True:\n    os.fork()", lambda r: not r.ok),
    ("memory-bomb", "a = []\nwhile True:\n    a.append(bytearray(1 << 24))", lambda r: r.limit == "memory"),
    ("huge-output", "while True:\n    print('x' * 1000)", lambda r: r.truncated and len(r.stdout) < 20_000),
    ("one-huge-write", "print('y' * 50_000_000)", lambda r: r.ok and r.truncated and len(r.stdout) < 20_000),
    (
        "write-outside-workdir",
        "import os\nfor d in {dirs!r}:\n    try:\n        open(os.path.join(d, {escape!r}), 'w').write('x')\n"
        "    except OSError as e:\n        print(type(e).__name__)\nopen('../' + {escape!r}, 'w')",
        lambda r: True,
    ),
    (
        "read-environment-secrets",
        "import os\nprint(dict(os.environ))\nfor p in ('/proc/1/environ', '/proc/{pid}/environ'):\n"
        "    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n        print(e)",
        lambda r: "hunter2" not in r.stdout + r.stderr,
    ),
    ("kill-the-parent", "import os\nos.kill(os.getppid(), 9)", lambda r: True),
    (
        "setsid-escape",
        "import subprocess\nsubprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
        "import os\nif os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(1000)",
        lambda r: r.ok,
    ),
    ("os-exit", "import os\nos._exit(7)", lambda r: not r.ok and "exit code 7" in r.stderr),
    ("sys-exit", "import sys\nsys.exit(3)", lambda r: not r.ok and "SystemExit: 3" in r.stderr),
    ("recursion-overflow", "def f():\n    return f()\nf()", lambda r: "RecursionError" in r.stderr),
    ("c-stack-overflow", "import sys\nsys.setrecursionlimit(10**8)\ndef f():\n    return f()\nf()", lambda r: not r.ok),
    ("segfault", "import ctypes\nctypes.string_at(0)", lambda r: not r.ok and "SIGSEGV" in r.stderr),
    ("read-stdin", "import sys\nprint(repr(sys.stdin.read()))\ninput()", lambda r: "EOFError" in r.stderr),
    (
        "threads-keep-running",
        "import threading, time\ndef spin():\n    while True:\n        time.sleep(0.01)\n"
        "for _ in range(4):\n    threading.Thread(target=spin).start()\nprint('started')",
        lambda r: r.ok and r.stdout == "started\n",
    ),
    (
        "daemon-process",
        "import subprocess\nsubprocess.Popen(['sh', '-c', 'sleep 1000 &'])\n"
        "import os\nif os.fork() == 0:\n    if os.fork() == 0:\n"
        "        import time\n        time.sleep(1000)\n    os._exit(0)",
        lambda r: r.ok,
    ),
]


@needs_namespaces
@pytest.mark.parametrize("name,code,expect", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_code_is_contained(name, code, expect, monkeypatch):
    """For each hostile cell: the call returns within timeout + 1 s with the expected outcome,
    the trainer is untouched, nothing is written outside the session's directory, no process
    of the session survives close(), and the next call in a new session works."""
    monkeypatch.setenv("GTPO_TEST_SECRET", "hunter2")
    marker = os.urandom(6).hex()
    escape = ESCAPE.format(marker=marker)
    code = code.format(dirs=HOST_DIRS + ["/root", os.path.expanduser("~")], escape=escape, pid=os.getpid())
    session = sandbox.Session(timeout=TIMEOUT, memory_mb=512)
    try:
        assert session.run("1").ok  # start-up outside the timed call
        started = time.monotonic()
        result = session.run(code)
        elapsed = time.monotonic() - started
        assert elapsed < TIMEOUT + 1.0, f"{name}: the call took {elapsed:.2f} s"
        assert expect(result), f"{name}: unexpected {result}"
        assert not result.infra_error, "the code's failures are the code's fault"
        after = session.run("print(6 * 7)")
        assert after.ok and after.stdout.endswith("42\n"), after
    finally:
        session.close()
    assert session_processes(session) == [], f"{name}: processes survived close()"
    for d in HOST_DIRS + [os.path.expanduser("~")]:
        assert not os.path.exists(os.path.join(d, escape)), f"{name}: wrote {escape} in {d}"


@needs_namespaces
def test_no_connection_to_a_listener_on_the_host_loopback():
    """A listener on the host's 127.0.0.1 cannot be reached from the sandbox, and the sandbox sees
    no network interface but loopback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        with sandbox.Session(timeout=TIMEOUT) as session:
            result = session.run(
                "import socket\nprint([name for _, name in socket.if_nameindex()])\n"
                f"socket.create_connection(('127.0.0.1', {port}), timeout=1)"
            )
        assert result.stdout == "['lo']\n", result
        assert not result.ok and "OSError" in result.stderr, result
        with pytest.raises(socket.timeout):
            listener.accept()


@needs_namespaces
def test_the_sandbox_cannot_see_or_signal_the_trainer():
    """The trainer's PID does not exist inside the sandbox, and signalling the namespace's init fails."""
    with sandbox.Session(timeout=TIMEOUT) as session:
        result = session.run(f"import os\nprint(os.path.exists('/proc/{os.getpid()}'), os.getpid() != {os.getpid()})")
        assert result.stdout == "False True\n" or os.getpid() <= 2, result
        result = session.run("import os\nos.kill(1, 9)")
        assert "PermissionError" in result.stderr, result


# ---------------------------------------------------------------- behaviour of a session


@pytest.fixture(params=["namespaces", "process"] if NAMESPACES else ["process"])
def session(request):
    with sandbox.Session(timeout=TIMEOUT, isolate=request.param) as s:
        yield s


def test_state_persists_across_calls(session):
    """Names, imports and functions defined in one call are usable in the next."""
    assert session.run("import math\nx = 6\ndef double(v):\n    return 2 * v").ok
    result = session.run("print(double(x), math.sqrt(49))")
    assert result.ok and result.stdout == "12 7.0\n", result


def test_an_error_leaves_the_session_usable_and_its_state_intact(session):
    """After a raising call, earlier state is still there and later calls run; the traceback's
    last line names the error and the cell's own line is shown."""
    session.run("total = 10")
    failed = session.run("y = 1\nraise ValueError('bad turn')")
    assert not failed.ok and failed.stderr.rstrip().splitlines()[-1] == "ValueError: bad turn"
    assert "raise ValueError('bad turn')" in failed.stderr
    assert "sandbox.py" not in failed.stderr, "the worker's own frames are not shown"
    recovered = session.run("print(total + y)")
    assert recovered.ok and recovered.stdout == "11\n" and not recovered.state_lost


def test_a_bare_last_expression_is_printed_only_when_nothing_else_was(session):
    """The value of a final bare expression is printed, as in a notebook, unless the cell printed."""
    assert session.run("a = 2\na * 21").stdout == "42\n"
    assert session.run("print('hi')\na * 21").stdout == "hi\n"
    assert session.run("None").stdout == ""
    assert session.run("'text'").stdout == "'text'\n"


def test_unicode_and_binary_output_arrive_intact_or_replaced(session):
    """Unicode round-trips; invalid UTF-8 bytes become replacement characters, not an error."""
    code = "import sys\nprint('π ≈ 3.14159 — 数学 ✓', flush=True)\nsys.stdout.buffer.write(b'\\xff\\xfe ok\\n')"
    result = session.run(code)
    assert result.ok and result.stdout == "π ≈ 3.14159 — 数学 ✓\n\ufffd\ufffd ok\n", result


def test_truncation_keeps_the_head_and_the_tail(session):
    """Output beyond max_output keeps its first and last bytes and says how much was dropped."""
    result = session.run("for i in range(100000):\n    print(i)")
    assert result.truncated and result.stdout.startswith("0\n1\n2\n") and result.stdout.endswith("99999\n")
    assert "bytes of output dropped" in result.stdout


def test_a_timeout_restarts_the_session_and_says_state_was_lost(session):
    """After a timeout the next call runs in a fresh session, marked state_lost, with a note."""
    session.run("kept = 1")
    assert session.run("while True:\n    pass").timed_out
    after = session.run("print('kept' in globals())")
    assert after.ok and after.stdout == "False\n" and after.state_lost and "state was lost" in after.stderr


def test_sessions_do_not_see_each_other():
    """Two sessions alive at once have separate state and separate working directories."""
    with sandbox.Session(timeout=TIMEOUT) as a, sandbox.Session(timeout=TIMEOUT) as b:
        a.run("secret = 'a'\nopen('mine.txt', 'w').write('a')")
        assert "NameError" in b.run("secret").stderr
        assert b.run("import os\nos.path.exists('mine.txt')").stdout == "False\n"


PLANT = """import builtins, json, os, subprocess, sys
planted = 'left behind'
json.planted = builtins.planted = 1
os.environ['PLANTED'] = '1'
sys.modules['planted_module'] = json
sys.path.append('/planted')
for d in {dirs!r}:
    try:
        open(os.path.join(d, 'planted'), 'w').write('x')
    except OSError:
        pass
subprocess.Popen(['sleep', '{marker}'])
"""
LOOK = """import builtins, json, os, sys
found = [name for name, there in [
    ('variable', 'planted' in globals()), ('module attribute', hasattr(json, 'planted')),
    ('builtin', hasattr(builtins, 'planted')), ('environment', 'PLANTED' in os.environ),
    ('module', 'planted_module' in sys.modules), ('sys.path', '/planted' in sys.path)] if there]
found += [d for d in {dirs!r} if os.path.exists(os.path.join(d, 'planted'))]
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        found += ['process'] if b'{marker}' in open(f'/proc/{{pid}}/cmdline', 'rb').read() else []
    except OSError:
        pass
print(found)
"""


@pytest.mark.parametrize("isolate", ["namespaces", "process"] if NAMESPACES else ["process"])
def test_nothing_of_one_session_is_visible_to_the_next(isolate):
    """A session forked from the template after another one planted a variable, a module
    attribute, a builtin, an environment variable, a module, a sys.path entry, files and a
    running process finds none of them; nor does the same session after a restart."""
    # process mode shares /tmp and the like with the host (see sandbox.py): its own directory only
    dirs = [".", "/tmp", "/var/tmp", "/dev/shm", "/run"] if isolate == "namespaces" else ["."]
    marker = f"{1000 + int.from_bytes(os.urandom(2), 'little')}.{os.getpid()}"
    plant, look = PLANT.format(dirs=dirs, marker=marker), LOOK.format(dirs=dirs, marker=marker)
    with sandbox.Session(timeout=TIMEOUT, isolate=isolate) as first:
        assert first.run(plant).ok
        assert first.run(look).stdout != "[]\n", "the planting did not take: the check would prove nothing"
        assert first.run("while True:\n    pass").timed_out  # restarts the session
        assert first.run(look).stdout == "[]\n"
        first.run(plant)
    with sandbox.Session(timeout=TIMEOUT, isolate=isolate) as second:
        assert second.run(look).stdout == "[]\n"


def test_a_sandbox_that_cannot_start_is_an_infrastructure_error(monkeypatch):
    """When the worker cannot be started, the result is infra_error (not the code's fault)."""
    monkeypatch.setattr(sandbox.sys, "executable", "/nonexistent/python")
    with sandbox.Session(timeout=TIMEOUT) as session:
        result = session.run("1")
    assert result.infra_error and not result.ok and "sandbox failure" in result.stderr


def test_the_pool_runs_calls_concurrently_and_keeps_order():
    """Pool.run returns results in input order, and calls of different sessions overlap in time."""
    with sandbox.Pool(max_workers=4, timeout=10) as pool:
        sessions = [pool.session() for _ in range(4)]
        codes = [f"import time\nstart = time.time()\ntime.sleep(0.5)\nprint({i}, start, time.time())" for i in range(4)]
        results = pool.run(sessions, codes)
    spans = [tuple(map(float, r.stdout.split()[1:])) for r in results]
    assert [int(r.stdout.split()[0]) for r in results] == [0, 1, 2, 3]
    latest_start, earliest_end = max(s for s, _ in spans), min(e for _, e in spans)
    assert latest_start < earliest_end, "all four sleeps overlapped"


@pytest.mark.parametrize("isolate", ["namespaces", "process"] if NAMESPACES else ["process"])
def test_each_resource_limit_is_enforced_and_named(isolate):
    """CPU time, file size and memory limits stop the code and the result names the limit hit."""
    with sandbox.Session(timeout=5, cpu_seconds=1, max_file_mb=1, memory_mb=256, isolate=isolate) as s:
        cpu = s.run("while True:\n    pass")
        assert cpu.limit == "cpu" and not cpu.timed_out, cpu
        big_file = s.run("open('big.bin', 'wb').write(b'0' * (2 << 20))")
        assert big_file.limit == "file_size" and "File too large" in big_file.stderr, big_file
        memory = s.run("block = bytearray(512 << 20)")
        assert memory.limit == "memory" and "MemoryError" in memory.stderr, memory


@pytest.mark.parametrize("isolate", ["namespaces", "process"] if NAMESPACES else ["process"])
def test_nothing_is_left_behind_in_the_trainer(isolate):
    """Sessions that run, time out, crash and close leave no open file descriptor, no thread and
    no work directory behind in the trainer."""

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    import threading

    with sandbox.Session(isolate=isolate) as warmup:
        warmup.run("1")  # starts this process's template: one socket, held until exit, not a leak
    fds, threads = open_fds(), threading.active_count()
    workdirs = []
    for code in ("x = 1", "while True:\n    pass", "import os\nos._exit(1)", "print('after')"):
        with sandbox.Pool(max_workers=2, timeout=1.0, isolate=isolate) as pool:
            sessions = [pool.session(), pool.session()]
            results = pool.run(sessions, [code, code])
            workdirs += [s.workdir for s in sessions if s.workdir]
        assert all(not r.infra_error for r in results), results
    assert open_fds() == fds and threading.active_count() == threads
    assert all(not os.path.exists(w) for w in workdirs)
    if isolate == "process":
        assert workdirs, "process mode keeps a work directory on the host while a session lives"


# ---------------------------------------------------------------- attacks on the sandbox itself


@needs_namespaces
def test_a_stopped_worker_cannot_hang_the_trainer():
    """A worker that stops itself cannot block the trainer: sending a large cell to it times out."""
    with sandbox.Session(timeout=TIMEOUT) as session:
        session.run(
            "import os, signal, threading, time\n"
            "threading.Thread(target=lambda: (time.sleep(0.2), os.kill(os.getpid(), signal.SIGSTOP))).start()"
        )
        time.sleep(0.5)
        started = time.monotonic()
        result = session.run("x = 1\n" + "#" * 200_000)
        assert time.monotonic() - started < TIMEOUT + 1.0 and result.timed_out
        assert session.run("print('fresh')").stdout == "fresh\n"


@pytest.mark.parametrize(
    "forgery",
    [
        "struct.pack('!I', 0xFFFFFFF0) + b'x' * 100000",  # an enormous announced length
        "struct.pack('!I', 2) + b'{}'",  # valid JSON, wrong shape
        "struct.pack('!I', 200000) + b'[' * 200000",  # nesting that breaks the decoder
        '(lambda b: struct.pack(\'!I\', len(b)) + b)(b\'{"ok": "yes", "limit": [1]}\')',  # wrong types
    ],
)
def test_forged_answers_are_the_codes_fault_and_never_raise(forgery):
    """Writing a forged answer on the protocol pipe gives a failed Result (not an exception, not
    infra_error) and the next call runs in a fresh session."""
    with sandbox.Session(timeout=TIMEOUT) as session:
        res_fd = "__import__('json').loads(__import__('sys').argv[2])['res_fd']"
        result = session.run(f"import os, struct\nos.write({res_fd}, {forgery})\nimport time\ntime.sleep(1)")
        assert not result.ok and not result.infra_error, result
        assert session.run("print(1)").stdout == "1\n"


@needs_namespaces
def test_system_v_shared_memory_does_not_cross_sessions():
    """A SysV shared-memory segment made in one session is invisible to another."""
    make = "import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.shmget(0x6a7e, 4096, 0o1666))"
    look = "import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.shmget(0x6a7e, 0, 0o666))"
    with sandbox.Session(timeout=TIMEOUT) as a, sandbox.Session(timeout=TIMEOUT) as b:
        assert int(a.run(make).stdout) >= 0
        assert int(b.run(look).stdout) == -1


@needs_namespaces
def test_unix_socket_files_on_the_host_are_unreachable(tmp_path):
    """A unix socket listening at a host path under /run or /tmp cannot be reached from the sandbox."""
    paths = [f"/run/gtpo-test-{os.getpid()}.sock", str(tmp_path / "listener.sock")]
    listeners = []
    try:
        for path in paths:
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(path)
            os.chmod(path, 0o777)
            listener.listen(1)
            listener.settimeout(0.2)
            listeners.append(listener)
        code = (
            "import socket\nfor p in {!r}:\n    try:\n        socket.socket(socket.AF_UNIX).connect(p)\n"
            "        print('reached', p)\n    except OSError as e:\n        print(type(e).__name__)"
        )
        with sandbox.Session(timeout=TIMEOUT) as session:
            result = session.run(code.format(paths))
        assert "reached" not in result.stdout and result.stdout.count("Error") == 2, result
        for listener in listeners:
            with pytest.raises(socket.timeout):
                listener.accept()
    finally:
        for listener in listeners:
            listener.close()
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)


@needs_namespaces
def test_a_trainer_that_dies_without_closing_takes_its_sandboxes_with_it(tmp_path):
    """If the trainer is killed without close(), its sessions' processes (busy threads and
    background children included) end by themselves."""
    script = tmp_path / "trainer.py"
    script.write_text(
        "import os, sys, sandbox\n"
        "s = sandbox.Session(timeout=5)\n"
        "s.run('import threading, subprocess\\n"
        "threading.Thread(target=lambda: [0 for _ in iter(int, 1)]).start()\\n"
        'subprocess.Popen(["sleep", "1000"])\')\n'
        "print(*s.pid_namespaces, flush=True)\n"
        "os._exit(0)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(sandbox.__file__))
    namespaces = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60
    ).stdout.split()
    assert namespaces
    gone = sandbox.Session()  # stands for the dead trainer's session: only its namespaces are read
    gone.pid_namespaces = namespaces
    deadline = time.monotonic() + 5
    while session_processes(gone) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session_processes(gone) == []


def test_output_written_between_calls_is_not_blamed_on_the_next_call():
    """Output a background thread writes after its call returned is dropped with a note."""
    with sandbox.Session(timeout=TIMEOUT) as session:
        session.run("import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.1), print('late'))).start()")
        time.sleep(0.5)
        result = session.run("print(42)")
        assert result.stdout == "42\n" and "dropped" in result.stderr, result


@needs_namespaces
def test_live_sessions_hold_distinct_uids_and_release_them():
    """Concurrent sessions run under different uids; a closed session's uid can be leased again."""
    sessions = [sandbox.Session(timeout=TIMEOUT) for _ in range(3)]
    try:
        uids = [int(s.run("import os\nos.getuid()").stdout) for s in sessions]
        assert len(set(uids)) == 3 and all(uid >= sandbox._UID_BASE for uid in uids)
    finally:
        for s in sessions:
            s.close()
    assert all(s.uid_lease is None for s in sessions)


def test_file_descriptors_above_1023_do_not_break_the_trainer():
    """A trainer with over a thousand open files still runs sessions (poll, not select)."""
    extra = [os.dup(0) for _ in range(1100)]
    try:
        with sandbox.Session(timeout=TIMEOUT) as session:
            result = session.run("print('ok')")
        assert result.ok and result.stdout == "ok\n", result
    finally:
        for fd in extra:
            os.close(fd)


def test_closing_a_pool_waits_for_calls_in_flight():
    """Pool.close() while a batch runs lets the batch finish cleanly, then closes the sessions."""
    import threading

    pool = sandbox.Pool(max_workers=2, timeout=5)
    sessions = [pool.session(), pool.session()]
    results = []
    runner = threading.Thread(
        target=lambda: results.extend(pool.run(sessions, ["import time\ntime.sleep(0.5)\n1"] * 2))
    )
    runner.start()
    time.sleep(0.2)
    pool.close()
    runner.join()
    assert [r.stdout for r in results] == ["1\n", "1\n"]


def test_prewarmed_spares_are_handed_out_first_and_work():
    """Pool.prewarm starts workers ahead; session() hands those out (already running), then new ones."""
    with sandbox.Pool(max_workers=2, timeout=TIMEOUT) as pool:
        pool.prewarm(2, wait=True)
        warm = [pool.session(), pool.session()]
        assert all(s.proc is not None for s in warm)
        cold = pool.session()
        assert cold.proc is None and cold not in warm
        results = pool.run(warm + [cold], ["1", "2", "3"])
        assert [r.stdout for r in results] == ["1\n", "2\n", "3\n"]


def test_a_template_that_died_is_replaced_and_live_sessions_still_close_cleanly():
    """Killing the template a session was forked from leaves that session usable and closable,
    and the next session starts from a new template."""
    with sandbox.Session(timeout=TIMEOUT) as before:
        assert before.run("x = 1").ok
        template = sandbox._shared_template(before.mode)
        template.proc.kill()
        template.proc.wait()
        assert before.run("print(x + 1)").stdout == "2\n"
        with sandbox.Session(timeout=TIMEOUT) as after:
            assert after.run("print('fresh')").stdout == "fresh\n"
        assert sandbox._shared_template(before.mode) is not template

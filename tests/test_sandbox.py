"""The sandbox: an infinite loop, a fork bomb, a 10 GB allocation, writes outside its directory, a network
connection and an stdout flood are each stopped or denied, and this test process is untouched (alive, its
files, cwd and limits intact). The attacks run twice where it matters: with every layer, and with the
Python audit hook off, to show the kernel-enforced layers beneath it hold on their own."""

import ast
import glob
import os
import resource
import socket
import subprocess
import tempfile
import time

import pytest

from nanoseek.sandbox import runner as sandbox
from nanoseek.sandbox.runner import SandboxConfig, run_many, run_python

FAST = SandboxConfig(cpu_seconds=1, wall_seconds=30)  # CPU limits hit long before the wall on a busy machine
NO_GUARD = SandboxConfig(cpu_seconds=1, wall_seconds=30, audit_guard=False)


def _namespaced() -> bool:
    return any(d.startswith("namespaces") for d in run_python("pass").defences)


NAMESPACES = _namespaced()
needs_namespaces = pytest.mark.skipif(
    not NAMESPACES,
    reason="this machine permits no namespaces; with the audit hook off nothing would contain these programs",
)


def _pids_of(uids: set[int]) -> list[int]:
    out = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            with open(status) as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if uid in uids:
            out.append(int(status.split("/")[2]))
    return out


@pytest.fixture(autouse=True)
def untouched(tmp_path, monkeypatch):
    """Each test: this process keeps its cwd, its files, its limits, and can still start processes; no
    sandbox process or temporary directory outlives the run."""
    cwd, sentinel = os.getcwd(), tmp_path / "sentinel.txt"
    sentinel.write_text("mine")
    limits = {
        r: resource.getrlimit(r)
        for r in (
            resource.RLIMIT_CPU,
            resource.RLIMIT_AS,
            resource.RLIMIT_NPROC,
            resource.RLIMIT_FSIZE,
            resource.RLIMIT_NOFILE,
        )
    }
    temps = tmp_path.parent / f"{tmp_path.name}-sandboxes"  # this test's sandboxes make their directories here
    temps.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temps))
    uids = set()  # the unprivileged uids this test's runs had
    collect = sandbox._collect

    def recording(*args):
        r = collect(*args)
        uids.update(int(d.split()[-1]) for d in r.defences if d.startswith("unprivileged uid"))
        return r

    monkeypatch.setattr(sandbox, "_collect", recording)
    yield tmp_path
    assert os.getcwd() == cwd and sentinel.read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["sentinel.txt"], "a sandbox wrote into the test's directory"
    assert {r: resource.getrlimit(r) for r in limits} == limits
    assert subprocess.run(["true"]).returncode == 0
    assert os.listdir(temps) == [], "a sandbox temporary directory was left behind"
    for _ in range(50):  # the kernel tears a PID namespace down asynchronously; give it a moment
        if not _pids_of(uids):
            break
        time.sleep(0.1)
    assert not _pids_of(uids), "a sandbox process outlived its run"


def test_correct_code_passes_and_wrong_code_fails():
    r = run_python("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3 4")
    assert r.ok and r.returncode == 0 and r.stdout == "10\n" and not r.timed_out and r.killed is None
    r = run_python("def f(x):\n    return x +\n")
    assert not r.ok and r.returncode == 1 and "SyntaxError" in r.stderr
    r = run_python("raise ValueError('wrong')")
    assert not r.ok and r.returncode == 1 and "ValueError: wrong" in r.stderr
    r = run_python("import sys; sys.exit(3)")
    assert not r.ok and r.returncode == 3 and r.killed is None
    r = run_python("import json, math, re, collections, itertools, fractions; print(math.factorial(20))")
    assert r.ok and r.stdout == "2432902008176640000\n", r.stderr  # the standard library works


def test_infinite_loop_stopped_by_cpu_limit():
    r = run_python("while True: pass", config=FAST)
    assert not r.ok and r.killed == "cpu time" and r.returncode is None and not r.timed_out


def test_sleep_stopped_by_wall_clock():
    t = time.monotonic()
    r = run_python("import time\nprint('start', flush=True)\ntime.sleep(60)", config=SandboxConfig(wall_seconds=1.0))
    assert r.timed_out and r.killed == "wall time" and not r.ok and r.stdout == "start\n"
    assert time.monotonic() - t < 10


def test_fork_bomb_denied():
    r = run_python("import os\nwhile True:\n    os.fork()", config=FAST)
    assert not r.ok and "os.fork is not allowed" in r.stderr
    for code in [
        "import subprocess; subprocess.run(['true'])",
        "import os; os.system('true')",
        "import os; os.posix_spawn('/bin/true', ['true'], {})",
        "import multiprocessing",
        "import pty; pty.fork()",
        "import os; os.execv('/bin/true', ['true'])",
    ]:
        r = run_python(code, config=FAST)
        assert not r.ok and "not allowed" in r.stderr, code


@needs_namespaces
def test_fork_bomb_contained_by_kernel_limits():
    """With the audit hook off: RLIMIT_NPROC for the sandbox's own uid caps the processes; when the run ends
    its PID namespace goes, with every process in it."""
    count = (
        "import os, time\nn = 0\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
        "    n += 1\nprint(n)"
    )
    r = run_python(count, config=NO_GUARD)
    assert r.ok and 1 <= int(r.stdout) < NO_GUARD.max_processes, (r.stdout, r.stderr)
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run_python(bomb, config=SandboxConfig(cpu_seconds=1, wall_seconds=3, audit_guard=False))
    assert not r.ok and r.killed in ("cpu time", "wall time")


@pytest.mark.parametrize("config", [FAST, NO_GUARD], ids=["all-layers", "kernel-only"])
def test_huge_allocation_fails(config):
    if not config.audit_guard and not NAMESPACES:
        pytest.skip("no namespaces")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = run_python("x = bytearray(10 * 1024**3)\nprint('allocated')", config=config)
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < rss + 100_000  # KiB: not in this process


@pytest.mark.parametrize("config", [FAST, NO_GUARD], ids=["all-layers", "kernel-only"])
def test_writes_outside_working_directory_denied(config, untouched):
    if not config.audit_guard and not NAMESPACES:
        pytest.skip("no namespaces")
    mine = untouched / "sentinel.txt"
    targets = [
        str(mine),
        str(untouched / "new.txt"),
        os.path.join(os.getcwd(), "escape.txt"),
        "/tmp/nanoseek-escape.txt",
        "../escape.txt",
        "/dev/shm/nanoseek-escape",
        "/var/tmp/nanoseek-escape",
    ]
    code = (
        "import os\nfor t in %r:\n    try:\n        with open(t, 'w') as f:\n            f.write('pwned')\n"
        "        print('wrote', t)\n    except OSError as e:\n        print('denied', t, type(e).__name__)\n"
        "for t in %r:\n    try:\n        os.remove(t)\n        print('removed', t)\n    except OSError as e:\n"
        "        print('denied', t)\n"
        "with open('inside.txt', 'w') as f:\n    f.write('ok')\nprint('inside', open('inside.txt').read())"
    ) % (targets, [str(mine)])
    r = run_python(code, config=config)
    assert r.ok, r.stderr
    assert "inside ok" in r.stdout  # its own directory is writable
    assert f"denied {mine}" in r.stdout
    for t in targets:
        if not t.startswith("/tmp/"):  # a private /tmp inside the namespaces may take it; ours must not
            assert f"denied {t}" in r.stdout, (t, r.stdout)
    assert mine.read_text() == "mine"
    for t in targets[1:]:
        assert not os.path.exists(t if t.startswith("/") else os.path.join(os.getcwd(), t)), t


def test_big_files_stopped_by_file_size_limit():
    r = run_python(
        "with open('big', 'wb') as f:\n    f.write(b'x' * (4 << 20))", config=SandboxConfig(file_bytes=1 << 20)
    )
    # CPython ignores SIGXFSZ, so the write fails with EFBIG instead of the process being killed
    assert not r.ok and (r.killed == "file size" or "File too large" in r.stderr), (r.killed, r.stderr)


@pytest.mark.parametrize("config", [FAST, NO_GUARD], ids=["all-layers", "kernel-only"])
def test_network_denied(config):
    if not config.audit_guard and not NAMESPACES:
        pytest.skip("no namespaces")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = (
            f"import socket\ntry:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            f"    s.sendall(b'hello')\n    print('connected')\nexcept OSError as e:\n    print('denied', e)"
        )
        r = run_python(code, config=config)
        assert r.ok and r.stdout.startswith("denied") and "connected" not in r.stdout, (r.stdout, r.stderr)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached us


def test_stdout_flood_stopped():
    cfg = SandboxConfig(output_bytes=10_000, wall_seconds=30)
    r = run_python("while True:\n    print('x' * 1000)", config=cfg)
    assert not r.ok and r.killed == "output size" and len(r.stdout) <= 10_000
    r = run_python("import sys\nwhile True:\n    sys.stderr.write('y' * 1000)", config=cfg)
    assert r.killed == "output size" and len(r.stderr) <= 10_000


def test_run_many_in_order_and_in_parallel():
    codes = [f"import time; time.sleep(0.5); print({i})" for i in range(8)]
    t = time.monotonic()
    rs = run_many(codes, workers=8)
    assert [r.stdout for r in rs] == [f"{i}\n" for i in range(8)] and all(r.ok for r in rs)
    assert time.monotonic() - t < 8 * 0.5  # they overlapped
    mixed = run_many(["print('a')", "while True: pass", "1/0", "print('b')"], FAST, workers=2)
    assert [r.ok for r in mixed] == [True, False, False, True] and mixed[1].killed == "cpu time"
    assert run_many([]) == []


def test_defences_reported():
    d = run_python("pass").defences
    assert {"RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "audit hook"} <= set(d)
    if NAMESPACES:
        assert "RLIMIT_NPROC" in d and "no capabilities" in d and "no_new_privs" in d
        assert any(x.startswith("tmpfs workdir") for x in d)
    if NAMESPACES and os.geteuid() == 0:
        assert any(x.startswith("unprivileged uid") for x in d)


@needs_namespaces
def test_sandbox_sees_only_itself():
    r = run_python(
        "import os\nprint(os.getpid(), sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
        "print(os.getcwd(), os.listdir('.'), os.listdir('/tmp'))",
        config=NO_GUARD,
    )
    pid_line, cwd_line = r.stdout.splitlines()
    assert pid_line.startswith("2 ") and "'1'" in pid_line and len(ast.literal_eval(pid_line[2:])) == 2, r.stdout
    assert cwd_line == "/tmp/work [] ['work']"


def test_bad_config_is_a_clear_error():
    from nanoseek.errors import NanoseekError

    with pytest.raises(NanoseekError, match="cpu_seconds must be positive"):
        SandboxConfig(cpu_seconds=0)
    with pytest.raises(NanoseekError, match="2 programs but 1 stdins"):
        run_many(["pass", "pass"], stdins=["x"])


def test_without_namespaces_guard_and_limits_still_hold(untouched):
    """The opt-in for machines that permit no namespaces (isolate=False + allow_unisolated=True force it here)."""
    cfg = SandboxConfig(cpu_seconds=1, wall_seconds=30, output_bytes=10_000, isolate=False, allow_unisolated=True)
    assert not any(d.startswith("namespaces") for d in run_python("pass", config=cfg).defences)
    target = untouched / "new.txt"
    attacks = {
        "import os\nos.fork()": "os.fork is not allowed",
        "import socket\nsocket.socket()": "socket.__new__ is not allowed",
        f"open({str(target)!r}, 'w')": "outside the working directory",
        "import subprocess\nsubprocess.run(['true'])": "not allowed",
    }
    for code, message in attacks.items():
        r = run_python(code, config=cfg)
        assert not r.ok and message in r.stderr, (code, r.stderr)
    assert not target.exists()
    assert run_python("while True: pass", config=cfg).killed == "cpu time"
    assert run_python("while True: print('x' * 100)", config=cfg).killed == "output size"
    r = run_python("open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())", config=cfg)
    assert r.ok and r.stdout == "ok\n"

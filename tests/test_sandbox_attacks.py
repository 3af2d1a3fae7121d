"""Attacks a model-written program could try, each run in every sandbox mode this machine supports:

  full         namespaces + unprivileged uid + rlimits + no_new_privs + seccomp + fresh interpreter + audit hook
  kernel-only  the same with the audit hook off: the kernel layers on their own
  unisolated   no namespaces, only with the explicit opt-in allow_unisolated=True (what it still guarantees)

Each program really attempts its attack and prints what it observed; the tests assert on that and on the
world outside (the victim file unchanged, the victim process alive, its secret not printed). Without the
opt-in, a machine without namespaces refuses to run model code at all."""

import os
import random
import socket
import subprocess
import tempfile
import textwrap
import time

import pytest
from test_sandbox import NAMESPACES, untouched  # noqa: F401  (the fixture: nothing outlives a run)

from nanoseek.sandbox import runner as sandbox
from nanoseek.sandbox.runner import SandboxConfig, SandboxError, run_python
from nanoseek.tasks.registry import get_task

from helpers import REPO

MODES = {
    "full": SandboxConfig(cpu_seconds=1, wall_seconds=30),
    "kernel-only": SandboxConfig(cpu_seconds=1, wall_seconds=30, audit_guard=False),
    "unisolated": SandboxConfig(cpu_seconds=1, wall_seconds=30, isolate=False, allow_unisolated=True),
}
SECRET = "nanoseek-secret-7f3a9c"


@pytest.fixture(params=list(MODES))
def mode(request):
    if request.param != "unisolated" and not NAMESPACES:
        pytest.skip("this machine permits no namespaces (neither as root nor via a user namespace)")
    return request.param


def run(mode: str, code: str, **subst):
    r = run_python(textwrap.dedent(code) % subst if subst else textwrap.dedent(code), config=MODES[mode])
    assert r.error is None, r.error
    assert ("audit hook" in r.defences) == (mode != "kernel-only")
    assert any(d.startswith("UNISOLATED") for d in r.defences) == (mode == "unisolated")
    return r


@pytest.fixture
def victim_dir():
    """A world-writable directory outside /tmp (visible inside the namespaces too) holding a world-writable
    file: what stops the program there is the sandbox, not the directory's permissions."""
    base = next(d for d in ("/run", "/var/cache", os.path.expanduser("~"), str(REPO)) if os.access(d, os.W_OK))
    d = tempfile.mkdtemp(prefix="nanoseek-victim-", dir=base)
    os.chmod(d, 0o777)
    with open(os.path.join(d, "victim.txt"), "w") as f:
        f.write("mine")
    os.chmod(os.path.join(d, "victim.txt"), 0o666)
    yield d
    assert sorted(os.listdir(d)) == ["victim.txt"], "the program wrote outside its directory"
    with open(os.path.join(d, "victim.txt")) as f:
        assert f.read() == "mine"
    subprocess.run(["rm", "-rf", d], check=True)


@pytest.fixture
def victim_process():
    """A process standing for the trainer: the parent's user, a secret in its environment."""
    p = subprocess.Popen(["sleep", "120"], env={"PATH": "/usr/bin:/bin", "TRAINER_TOKEN": SECRET})
    yield p
    alive = p.poll() is None
    p.kill()
    p.wait()
    assert alive, "the program killed or stopped the trainer's stand-in"


def test_frame_walk_finds_no_parent_objects(mode):
    """The frames, the globals they reach and (where gc is allowed) every live object: no ctypes, no libc
    handle, no function of the sandbox's setup (the program runs in a fresh interpreter)."""
    r = run(
        mode,
        """
        import sys
        names, n = set(), 0
        f = sys._getframe()
        while f is not None:
            names.update(f.f_globals)
            n += 1
            f = f.f_back
        def g():
            yield sys._getframe().f_back
        names.update(next(g()).f_globals)
        try:
            1 / 0
        except ZeroDivisionError as e:
            names.update(e.__traceback__.tb_frame.f_globals)
        print("frames", n)
        print("names", sorted(names & {"libc", "ctypes", "CDLL", "lock_down", "run_worker", "setup_mounts", "mount"}))
        print("modules", sorted(m for m in sys.modules if "ctypes" in m or "nanoseek" in m))
        try:
            import gc
            bad = [o for o in gc.get_objects() if type(o).__name__ in ("CDLL", "PyCFuncPtr", "_FuncPtr")]
            print("gc handles", len(bad))
        except PermissionError as e:
            print("gc denied", e)
        """,
    )
    assert r.ok, r.stderr
    assert "names []" in r.stdout and "modules []" in r.stdout, r.stdout
    assert ("gc handles 0" if mode == "kernel-only" else "gc denied") in r.stdout, r.stdout


def test_ctypes_cannot_be_imported_or_loaded(mode):
    r = run(
        mode,
        """
        import sys
        for name in ("_ctypes", "ctypes"):
            sys.modules.pop(name, None)
            try:
                __import__(name)
                print("imported", name)
            except BaseException as e:
                print("failed", name, type(e).__name__)
        import importlib.machinery, importlib.util, os
        for d in sys.path:
            for f in (os.listdir(d) if os.path.isdir(d) else []):
                if f.startswith("_ctypes."):
                    try:
                        spec = importlib.util.spec_from_file_location("_ctypes", os.path.join(d, f))
                        importlib.util.module_from_spec(spec)
                        print("loaded", f)
                    except BaseException as e:
                        print("failed", f, type(e).__name__)
        """,
    )
    assert "imported" not in r.stdout and "loaded" not in r.stdout and "failed _ctypes " in r.stdout, r.stdout


def test_libc_calls_through_ctypes(mode, victim_dir):
    """The attack that reached libc before: `system`, `fork`, `socket` and `prctl` through ctypes. The
    program tries every way to a handle; none exists, so nothing it would have done happens."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        r = run(
            mode,
            """
            import sys
            try:
                import ctypes
                libc = ctypes.CDLL(None)
            except BaseException as e:
                print("no ctypes", type(e).__name__)
                sys.exit(0)
            print("system", libc.system(b"id > %(dir)s/system.txt"))
            print("fork", libc.fork())
            s = libc.socket(2, 1, 0)
            print("socket", s)
            print("prctl", libc.prctl(4, 1, 0, 0, 0))
            """,
            dir=victim_dir,
        )
        assert r.ok and r.stdout.startswith("no ctypes"), (r.stdout, r.stderr)
        with pytest.raises(socket.timeout):
            server.accept()


def test_kernel_state_the_program_sees(mode):
    """What a prctl through libc would have undone: no_new_privs, seccomp, no capabilities; the uid."""
    r = run(
        mode,
        """
        import os
        status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
        print("uid", os.getuid(), os.geteuid())
        for k in ("NoNewPrivs", "Seccomp", "CapEff", "CapPrm", "CapBnd"):
            print(k, status[k].strip())
        """,
    )
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert out["NoNewPrivs"] == "1" and out["Seccomp"] == "2", r.stdout
    assert out["CapEff"] == out["CapPrm"] == out["CapBnd"] == "0000000000000000", r.stdout
    uid = int(out["uid"].split()[0])
    if os.geteuid() == 0 and uid == 0:  # root without a fresh uid: only where it says so
        assert mode == "unisolated" and "UNISOLATED: still uid 0" in " ".join(r.defences)
    if mode != "unisolated" and os.geteuid() == 0:
        assert uid >= 100_000


def test_shadow_and_other_processes_are_unreadable(mode, victim_process):
    r = run(
        mode,
        """
        import os
        def read(path):
            try:
                with open(path, "rb") as f:
                    print("read", path, f.read()[:4000])
            except Exception as e:
                print("denied", path, type(e).__name__)
        read("/etc/shadow")
        for pid in (%(victim)d, os.getppid(), 1):
            read(f"/proc/{pid}/environ")
            read(f"/proc/self/root/proc/{pid}/environ")
            read(f"/dev/fd/../../{pid}/environ")
        try:
            print("listed", os.listdir(f"/proc/%(victim)d/fd"))
        except Exception as e:
            print("denied listing", type(e).__name__)
        """,
        victim=victim_process.pid,
    )
    assert SECRET not in r.stdout and "read /etc/shadow" not in r.stdout, r.stdout
    assert "root:" not in r.stdout and "listed" not in r.stdout, r.stdout
    assert f"denied /proc/{victim_process.pid}/environ" in r.stdout, r.stdout


def test_signals_and_pidfds_cannot_reach_the_trainer(mode, victim_process):
    """pidfd_open + pidfd_send_signal (no audit event covers them), a /proc/<pid> directory as a pidfd,
    kill: the program tries all, re-importing posix/_signal where they were taken away."""
    r = run(
        mode,
        """
        import os, sys
        def get(mod, name):
            m = __import__(mod)
            if not hasattr(m, name):
                sys.modules.pop(mod, None)
                m = __import__(mod)
            return getattr(m, name)
        def attempt(what, fn):
            try:
                fn()
                print("done", what)
            except Exception as e:
                print("denied", what, type(e).__name__)
        victim = %(victim)d
        attempt("pidfd", lambda: get("_signal", "pidfd_send_signal")(get("posix", "pidfd_open")(victim), 9))
        attempt("procfd", lambda: get("_signal", "pidfd_send_signal")(os.open(f"/proc/{victim}", os.O_RDONLY), 9))
        attempt("kill", lambda: get("posix", "kill")(victim, 9))
        attempt("kill parent", lambda: get("posix", "kill")(os.getppid(), 19))
        """,
        victim=victim_process.pid,
    )
    time.sleep(0.2)
    assert victim_process.poll() is None, r.stdout
    for what in ("pidfd", "procfd", "kill", "kill parent"):
        assert f"denied {what} " in r.stdout, (what, r.stdout)


def test_dir_fd_and_plain_writes_outside(mode, victim_dir):
    r = run(
        mode,
        """
        import os
        d = %(dir)r
        def attempt(what, fn):
            try:
                fn()
                print("done", what)
            except Exception as e:
                print("denied", what, type(e).__name__)
        def dirfd():
            return os.open(d, os.O_RDONLY)
        def write_at(name):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666, dir_fd=dirfd())
            os.write(fd, b"pwned")
        attempt("dir_fd new", lambda: write_at("dirfd.txt"))
        attempt("dir_fd victim", lambda: write_at("victim.txt"))
        attempt("dir_fd path", lambda: os.open(d, os.O_RDONLY | os.O_DIRECTORY))
        attempt("mkdir dir_fd", lambda: os.mkdir("made", dir_fd=dirfd()))
        attempt("rename dir_fd", lambda: os.rename("victim.txt", "moved.txt", src_dir_fd=dirfd(), dst_dir_fd=dirfd()))
        attempt("open victim", lambda: open(d + "/victim.txt", "w").write("pwned"))
        attempt("open new", lambda: open(d + "/new.txt", "w").write("pwned"))
        attempt("chmod", lambda: os.chmod(d + "/victim.txt", 0))
        attempt("unlink", lambda: os.unlink(d + "/victim.txt"))
        attempt("inside", lambda: open("mine.txt", "w").write("ok"))
        """,
        dir=victim_dir,
    )
    assert "done inside" in r.stdout, (r.stdout, r.stderr)
    done = [line for line in r.stdout.splitlines() if line.startswith("done")]
    # a read-only descriptor of the directory is the kernel's to give; the audit hook refuses it too
    assert done == (["done dir_fd path", "done inside"] if mode == "kernel-only" else ["done inside"]), r.stdout


def test_no_isolation_is_refused_without_the_opt_in(monkeypatch, caplog):
    with pytest.raises(SandboxError, match="allow_unisolated"):
        SandboxConfig(isolate=False)
    with pytest.raises(SandboxError, match="audit_guard"):
        SandboxConfig(isolate=False, allow_unisolated=True, audit_guard=False)
    monkeypatch.setattr(sandbox, "_PRETEND_NO_NAMESPACES", True)  # as on a machine that permits none
    with pytest.raises(SandboxError, match="no isolation on this machine.*allow_unisolated=True"):
        run_python("print('ran')", config=MODES["full"])
    monkeypatch.setattr(sandbox, "_warned", set())
    with caplog.at_level("WARNING", logger="nanoseek.sandbox.runner"):
        r = run_python("print('ran')", config=SandboxConfig(allow_unisolated=True))
    assert r.ok and r.stdout == "ran\n" and any(d.startswith("UNISOLATED: no namespaces") for d in r.defences)
    assert "UNISOLATED" in caplog.text


def test_program_task_opt_in(monkeypatch):
    """The program task's knob: refused without it where no namespaces can be made, run (and marked) with it."""
    monkeypatch.setattr(sandbox, "_PRETEND_NO_NAMESPACES", True)
    task = get_task("program", sandbox=MODES["full"])
    p = task.sample(random.Random(0))
    with pytest.raises(SandboxError, match="allow_unisolated"):
        task.verify(p, p.answer)
    task = get_task("program", sandbox=MODES["full"], allow_unisolated=True)
    assert task.sandbox.allow_unisolated and task.verify(p, p.answer)

"""Run untrusted Python (model-written code) in a separate, locked-down process, with limits.

    from nanoseek.sandbox import SandboxConfig, run_python, run_many
    r = run_python("print(sum(range(10)))")              # SandboxResult(ok=True, stdout='45\\n', ...)
    rs = run_many(["print(1)", "while True: pass"], SandboxConfig(cpu_seconds=1), workers=2)
    python -m nanoseek.sandbox "print(2 + 2)"            # try it; prints the result and the layers in force

Each run starts `python -I -S -X utf8 nanoseek/sandbox/child.py` in a new session (its own process
group) with a minimal environment, in a fresh temporary directory that is deleted afterwards. The child
locks itself down (see child.py): new mount/network/PID/IPC/UTS namespaces (as root, or via a user
namespace), every mount read-only but a size-limited noexec tmpfs working directory, an unprivileged uid,
no capabilities, rlimits (CPU time, address space, file size, processes, open files), no_new_privs and a
seccomp filter; then it execs a fresh interpreter (boot.py) whose only inputs are the program text and a
few arguments, which adds a Python audit hook and runs the program. Where no namespaces can be made the
run is refused (SandboxError) unless `SandboxConfig(allow_unisolated=True)` says to run anyway; such runs
say UNISOLATED in their defences and log a warning. This side enforces what the child cannot: the
wall-clock limit and the output limit (it reads at most `output_bytes` of stdout and of stderr), killing
the whole process group on either, and it always kills the group when the run ends so that nothing
outlives it. Which layers took effect is reported per run in `SandboxResult.defences`.

Runs are independent processes, so many can run at once: `run_many` runs them from a thread pool.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from nanoseek.errors import NanoseekError

__all__ = ["SandboxConfig", "SandboxError", "SandboxResult", "run_many", "run_python"]

CHILD = Path(__file__).with_name("child.py")
BOOT = Path(__file__).with_name("boot.py")
_PRETEND_NO_NAMESPACES = False  # tests: make the child behave as on a machine that permits no namespaces
_log = logging.getLogger(__name__)
_warned: set[str] = set()
_SIGNAL_REASONS = {
    signal.SIGXCPU: "cpu time",
    signal.SIGKILL: "killed (SIGKILL)",
    signal.SIGXFSZ: "file size",
    signal.SIGSEGV: "crashed (SIGSEGV)",
}


class SandboxError(NanoseekError):
    """A sandbox configuration or call that cannot work (never raised for what a program does)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one run. Every one is enforced by the kernel or by the parent; see docs/tasks.md."""

    cpu_seconds: int = 2  # RLIMIT_CPU: SIGXCPU at this many CPU seconds, SIGKILL one second later
    wall_seconds: float = 5.0  # the parent kills the process group after this long
    memory_bytes: int = 512 * 2**20  # RLIMIT_AS: allocations beyond this fail (MemoryError)
    output_bytes: int = 64 * 2**10  # stdout and stderr each: read at most this; more kills the run
    file_bytes: int = 1 * 2**20  # RLIMIT_FSIZE: the largest file the program may write
    disk_bytes: int = 8 * 2**20  # size of the tmpfs working directory (with namespaces)
    max_processes: int = 8  # RLIMIT_NPROC for the sandbox's own uid (threads count too)
    open_files: int = 64  # RLIMIT_NOFILE
    isolate: bool = True  # use namespaces + an unprivileged uid where this machine permits them
    audit_guard: bool = True  # the Python audit-hook layer (turn off only to test the layers beneath)
    # Run model code even where no namespaces can be made (or with isolate=False): rlimits, seccomp, the
    # audit hook and, as root, a fresh uid only. Off: such a run raises SandboxError instead.
    allow_unisolated: bool = False

    def __post_init__(self):
        if not self.isolate and not self.allow_unisolated:
            raise SandboxError(
                "SandboxConfig(isolate=False) runs model code unisolated; say so with allow_unisolated=True"
            )
        if self.allow_unisolated and not self.audit_guard:
            raise SandboxError("SandboxConfig: allow_unisolated needs audit_guard (unisolated, it is a main layer)")
        for name in (
            "cpu_seconds",
            "wall_seconds",
            "memory_bytes",
            "output_bytes",
            "file_bytes",
            "disk_bytes",
            "max_processes",
            "open_files",
        ):
            if not getattr(self, name) > 0:
                raise SandboxError(f"SandboxConfig.{name} must be positive, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited with status 0 and no limit was hit
    returncode: int | None  # the program's exit status (None if it was killed)
    stdout: str  # at most output_bytes of it (utf-8, undecodable bytes replaced)
    stderr: str
    timed_out: bool  # the wall-clock limit was hit
    killed: str | None  # why it was stopped: "wall time", "cpu time", "output size", "file size", ...
    duration_s: float
    defences: tuple[str, ...]  # the layers that were in force for this run
    error: str | None = None  # the sandbox itself could not be set up (the program did not run)

    @property
    def unisolated(self) -> bool:
        """The program ran without namespaces (only with SandboxConfig(allow_unisolated=True))."""
        return any(d.startswith("UNISOLATED") for d in self.defences)


def run_python(code: str, stdin: str = "", config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run `code` as a Python program in the sandbox and return what happened. Never raises for
    anything the program does."""
    host_dir = tempfile.mkdtemp(prefix="nanoseek-sandbox-")
    try:
        program, stdin_path = Path(host_dir, "program.py"), Path(host_dir, "stdin")
        program.write_text(code, encoding="utf-8", errors="surrogatepass")
        stdin_path.write_text(stdin, encoding="utf-8")
        status_r, status_w = os.pipe()
        cfg = {
            **asdict(config),
            "cpu_seconds": math.ceil(config.cpu_seconds),
            "program": program,
            "host_dir": host_dir,
            "status_fd": status_w,
            "uid": 100_000 + secrets.randbelow(1_000_000),  # a uid no one else uses (when root)
            "boot": BOOT,
        }
        if _PRETEND_NO_NAMESPACES:
            cfg["pretend_no_namespaces"] = 1
        args = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cfg.items() if k != "wall_seconds"]
        start = time.monotonic()
        try:
            with open(stdin_path, "rb") as stdin_f:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-X", "utf8", str(CHILD), *args],
                    stdin=stdin_f,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=(status_w,),
                    start_new_session=True,
                    cwd=host_dir,
                    env={"PATH": "/usr/bin:/bin"},
                )
        finally:
            os.close(status_w)
        return _collect(proc, status_r, config, start)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def run_many(
    codes: Sequence[str],
    config: SandboxConfig = SandboxConfig(),
    workers: int | None = None,
    stdins: Sequence[str] | None = None,
) -> list[SandboxResult]:
    """`run_python` over many programs at once (results in order); workers defaults to the CPU count."""
    stdins = stdins if stdins is not None else [""] * len(codes)
    if len(stdins) != len(codes):
        raise SandboxError(f"{len(codes)} programs but {len(stdins)} stdins")
    if not codes:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(codes)))
    if workers == 1:
        return [run_python(c, s, config) for c, s in zip(codes, stdins)]
    with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda cs: run_python(cs[0], cs[1], config), zip(codes, stdins)))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc: subprocess.Popen, status_r: int, config: SandboxConfig, start: float) -> SandboxResult:
    """Read stdout/stderr/status until they close, within the wall-clock and output limits."""
    deadline = start + config.wall_seconds
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), status_r: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    killed = None
    try:
        while sel.get_map() and killed is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed = "wall time"
                break
            for key, _ in sel.select(remaining):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                room = config.output_bytes - len(buf) if key.fd != status_r else 1 << 16
                buf += chunk[: max(room, 0)]
                if len(chunk) > room:
                    killed = "output size"
                    break
        if killed:
            _kill_group(proc.pid)
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.05))
        except subprocess.TimeoutExpired:
            killed = killed or "wall time"
            _kill_group(proc.pid)
            proc.wait()
    finally:
        _kill_group(proc.pid)  # whatever the program left behind in its group dies with the run
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
        os.close(status_r)
    duration = time.monotonic() - start

    defences, end, error, refused = [], {}, None, None
    for line in bufs[status_r].decode("utf-8", "replace").splitlines():  # see child._report
        kind, _, text = line.partition(" ")
        if kind == "layer":
            defences.append(text)
        elif kind == "error":
            error = text
        elif kind == "refused":
            refused = text
        elif kind in ("exit", "signal") and text.isdigit():
            end = {kind: int(text)}
    if refused is not None:
        raise SandboxError(
            f"sandbox: model code not run: no isolation on this machine ({refused}). The sandbox needs Linux "
            "namespaces: run as root, or allow unprivileged user namespaces (user.max_user_namespaces > 0, "
            "kernel.unprivileged_userns_clone=1, no AppArmor userns restriction); in a container, a seccomp profile "
            "that permits unshare. To run model code without them anyway (rlimits, seccomp and the audit hook "
            "only; as root a fresh uid where Python is readable to it), pass SandboxConfig(allow_unisolated=True) "
            "(the program task's knob allow_unisolated=True)."
        )
    unisolated = [d for d in defences if d.startswith("UNISOLATED")]
    if unisolated and unisolated[0] not in _warned:
        _warned.add(unisolated[0])
        _log.warning("sandbox: model code ran UNISOLATED (allow_unisolated=True): %s", "; ".join(unisolated))
    returncode = end.get("exit")
    if killed is None and "signal" in end:
        sig = end["signal"]
        killed = _SIGNAL_REASONS.get(sig, f"signal {sig}")
    if killed is None and not end and error is None:
        error = f"sandbox exited with status {proc.returncode} without reporting"
    return SandboxResult(
        ok=killed is None and error is None and returncode == 0,
        returncode=None if killed else returncode,
        stdout=bufs[out_fd].decode("utf-8", "replace"),
        stderr=bufs[err_fd].decode("utf-8", "replace"),
        timed_out=killed == "wall time",
        killed=killed,
        duration_s=duration,
        defences=tuple(defences),
        error=error,
    )

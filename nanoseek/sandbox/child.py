"""The sandbox's child side. Never imported: runner.py runs it as

    python -I -S -X utf8 nanoseek/sandbox/child.py key=value ...

as the first code of a fresh interpreter, before any untrusted code. It locks the process down in layers,
each one that this machine permits (which ones took effect is reported to the parent on the status pipe):

  outer   (the process the parent started, in the parent's namespaces)
    unshare: new mount, network, PID, IPC and UTS namespaces. As root directly; otherwise inside a new
    user namespace (unprivileged user namespaces), where our uid is mapped to root. Then fork:
  init    (PID 1 of the new PID namespace)
    mounts, private to the namespace: a fresh /proc; a size-limited tmpfs on /tmp holding the working
    directory /tmp/work; empty read-only tmpfs over the other world-writable directories; when Python's
    own library sits under a directory the sandbox user may not enter (a home directory), a tmpfs over that
    directory with only the library bind-mounted back, read-only. Then fork, wait, report, exit; when
    init exits the kernel kills everything left in the namespace.
  worker  (PID 2: runs the program)
    rlimits (CPU time, address space, file size, open files, processes, no core files); as root, a
    fresh unprivileged uid/gid that owns nothing but the working directory (so RLIMIT_NPROC applies and
    the file system's permissions deny writes elsewhere); no_new_privs (no setuid binaries); dies with
    its parent; an empty environment; then a Python audit hook (PEP 578) denying process creation,
    sockets, ctypes, and writes outside the working directory; then the program.

Without namespaces (none permitted), the worker runs in the parent's temporary directory with the
rlimits and the audit hook only; the parent's kill of the whole process group is then what stops
stragglers. The audit hook is a second layer, not a boundary on its own (CPython's docs say as much).
"""

import ctypes
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
SIGKILL = 9  # not signal.SIGKILL: importing signal (enum, functools) triples our start-up time
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 38, 47
WORKDIR = "/tmp/work"  # the working directory inside the namespaces
SHARED_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")  # hidden under read-only tmpfs

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def unshare_namespaces() -> str:
    """Enter new namespaces: 'root' (as real root), 'userns' (via a user namespace) or 'none'."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if os.geteuid() == 0 and libc.unshare(flags) == 0:
        return "root"
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER | flags) == 0:
        for path, text in (
            ("/proc/self/setgroups", "deny"),
            ("/proc/self/uid_map", f"0 {uid} 1"),
            ("/proc/self/gid_map", f"0 {gid} 1"),
        ):
            with open(path, "w") as f:
                f.write(text)
        return "userns"
    return "none"


def _blocked_ancestor(path: str) -> str | None:
    """The highest directory above `path` that other users cannot enter, if any."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def expose_python(paths: list[str], uid: int) -> list[str]:
    """Make Python's library directories readable to `uid` when one sits under a directory it may not
    enter: cover that directory with an empty tmpfs and bind the library back, read-only."""
    done = []
    dirs = sorted({p for p in paths if os.path.isdir(p)})
    dirs = [d for d in dirs if not any(d.startswith(o + "/") for o in dirs)]  # outermost only
    by_block: dict[str, list[str]] = {}
    for d in dirs:
        block = _blocked_ancestor(d) if uid != 0 else None
        if block:
            by_block.setdefault(block, []).append(d)
    for block, ds in by_block.items():
        fds = [os.open(d, os.O_PATH | os.O_DIRECTORY) for d in ds]  # reachable after the cover
        mount("tmpfs", block, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for d, fd in zip(ds, fds):
            os.makedirs(d, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", d, None, MS_BIND | MS_REC)
            mount(None, d, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.close(fd)
            done.append(d)
    return done


def setup_mounts(cfg: dict, uid: int) -> list[str]:
    """In the new mount namespace (as its init): private propagation, fresh /proc, tmpfs /tmp with the
    working directory, read-only covers over shared writable directories, Python's library exposed."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    layers = []
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        layers.append("fresh /proc")
    except OSError:
        pass
    exposed = expose_python(sys.path, uid)  # before /tmp is covered (the library may live anywhere)
    if exposed:
        layers.append("library re-exposed read-only: " + ", ".join(exposed))
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_bytes']},mode=0755")
    os.mkdir(WORKDIR, 0o700)
    os.chown(WORKDIR, uid, uid)
    layers.append(f"tmpfs workdir {WORKDIR} ({cfg['disk_bytes']} bytes)")
    covered = []
    for d in SHARED_WRITABLE:
        if os.path.isdir(d) and not os.path.islink(d):
            try:
                mount("tmpfs", d, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0555")
                covered.append(d)
            except OSError:
                pass
    if covered:
        layers.append("read-only over " + " ".join(covered))
    return layers


def set_limits(cfg: dict, mode: str) -> list[str]:
    cpu = int(cfg["cpu_seconds"])
    limits = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, cfg["memory_bytes"], None),
        (resource.RLIMIT_FSIZE, cfg["file_bytes"], None),
        (resource.RLIMIT_NOFILE, cfg["open_files"], None),
        (resource.RLIMIT_CORE, 0, None),
    ]
    if mode != "none":  # counted per (namespace, uid): ours alone. Outside, it would count all our processes
        limits.append((resource.RLIMIT_NPROC, cfg["max_processes"], None))
    names = []
    for res, soft, hard in limits:
        resource.setrlimit(res, (soft, soft if hard is None else hard))
        names.append(
            {
                resource.RLIMIT_CPU: "RLIMIT_CPU",
                resource.RLIMIT_AS: "RLIMIT_AS",
                resource.RLIMIT_FSIZE: "RLIMIT_FSIZE",
                resource.RLIMIT_NOFILE: "RLIMIT_NOFILE",
                resource.RLIMIT_CORE: "RLIMIT_CORE",
                resource.RLIMIT_NPROC: "RLIMIT_NPROC",
            }[res]
        )
    return names


def make_guard(workdir: str):
    """The audit hook (PEP 578). Everything it calls is bound here, so a program that replaces module or
    builtin attributes (os.path.abspath, builtins.isinstance, ...) does not change what it checks."""
    deny_exact = frozenset(
        {
            "os.fork",
            "os.forkpty",
            "os.system",
            "os.exec",
            "os.spawn",
            "os.posix_spawn",
            "os.kill",
            "os.killpg",
            "os.symlink",
            "os.link",
            "pty.spawn",
            "subprocess.Popen",
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
            "sys._current_frames",
            "sys.setprofile",
            "sys.settrace",
            "os.mknod",
            "os.mkfifo",
        }
    )
    deny_prefix = (
        "socket.",
        "ctypes.",
        "_ctypes.",
        "subprocess.",
        "os.posix_spawn",
        "os.spawn",
        "os.exec",
        "resource.",
        "mmap.",
        "fcntl.",
        "winreg.",
        "_winapi.",
    )
    deny_import = frozenset(
        {
            "ctypes",
            "_ctypes",
            "_posixsubprocess",
            "_testcapi",
            "_testinternalcapi",
            "_xxsubinterpreters",
            "_xxinterpchannels",
            "mmap",
            "fcntl",
            "_multiprocessing",
            "multiprocessing",
            "pty",
        }
    )
    path_events = frozenset(
        {
            "os.remove",
            "os.rename",
            "os.rmdir",
            "os.mkdir",
            "os.chmod",
            "os.chown",
            "os.truncate",
            "os.utime",
            "os.setxattr",
            "os.removexattr",
            "shutil.rmtree",
            "os.chflags",
            "os.lchflags",
        }
    )
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    inside = workdir.rstrip("/") + "/"
    # C functions and types, captured: os.fsdecode would look `fspath` up in the os module at call time
    fspath, getcwd, _isinstance, _str, _bytes, _int, _any = os.fspath, os.getcwd, isinstance, str, bytes, int, any
    denied = PermissionError

    def normal(path) -> str:
        p = fspath(path)
        p = _bytes.decode(p, "utf-8", "surrogateescape") if _isinstance(p, _bytes) else _str(p)
        if not p.startswith("/"):
            p = getcwd() + "/" + p
        parts: list = []
        for part in p.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts) + "/"

    def outside(path) -> bool:
        if _isinstance(path, _int):  # an already open descriptor
            return False
        return not normal(path).startswith(inside)

    def guard(event: str, args: tuple) -> None:
        if event in deny_exact or event.startswith(deny_prefix):
            raise denied(f"sandbox: {event} is not allowed")
        if event == "import" and args and _isinstance(args[0], _str) and args[0].split(".")[0] in deny_import:
            raise denied(f"sandbox: import of {args[0]} is not allowed")
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writes = (_isinstance(flags, _int) and flags & write_flags) or (
                _isinstance(mode, _str) and _any(c in mode for c in "wax+")
            )
            if writes and outside(path):
                raise denied(f"sandbox: writing {path!r} outside the working directory is not allowed")
        elif event in path_events and args and outside(args[0]):
            raise denied(f"sandbox: {event} on {args[0]!r} outside the working directory is not allowed")
        elif event == "os.rename" and len(args) > 1 and outside(args[1]):
            raise denied(f"sandbox: {event} outside the working directory is not allowed")
        elif event == "object.__setattr__" and len(args) > 1 and args[1] in ("__code__", "__closure__"):
            raise denied("sandbox: replacing code objects is not allowed")

    return guard


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_bounding_set() -> None:
    """Empty the bounding and ambient capability sets (needs CAP_SETPCAP: before changing uid)."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # EINVAL: no such cap
            break
    libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets. Needed in a user namespace, where we are root
    of the namespace and could otherwise undo its mounts; as real root, changing uid already does it."""
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3, all zero
    _check(libc.capset(ctypes.byref(header), data), "capset")


def lock_down(cfg: dict, mode: str) -> list[str]:
    """In the worker, before the program: working directory, limits, identity, guard."""
    layers = []
    workdir = WORKDIR if mode != "none" else cfg["host_dir"]
    os.chdir(workdir)
    layers += set_limits(cfg, mode)
    if mode != "none":
        drop_bounding_set()
    if mode == "root":
        uid = cfg["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from 0 to another uid: the kernel clears the capability sets
        layers.append(f"unprivileged uid {uid}")
    if mode != "none":
        clear_capabilities()
        layers.append("no capabilities")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        layers.append("no_new_privs")
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # after setresuid, which clears it
    os.environ.clear()
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.")]:
        del sys.modules[name]
    if cfg["audit_guard"]:
        sys.addaudithook(make_guard(workdir))
        layers.append("audit hook")
    return layers


def run_worker(cfg: dict, mode: str, code: str, status_w: int) -> int:
    """PID 2: lock down, report, run the program; returns its exit status (never raises)."""
    try:
        layers = lock_down(cfg, mode)
    except BaseException as e:  # never run the program half-locked
        _report(status_w, "error", f"worker setup: {type(e).__name__}: {e}")
        return 125
    for layer in layers:
        _report(status_w, "layer", layer)
    os.close(status_w)
    sys.argv = ["program.py"]
    glb = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "program.py"}
    status = 0
    try:
        exec(compile(code, "program.py", "exec"), glb)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    return status & 0xFF


def _report(fd: int, kind: str, text: object) -> None:
    """One status line for the parent: "layer <what>", "exit <n>", "signal <n>" or "error <what>"."""
    os.write(fd, f"{kind} {text}".replace("\n", " ").encode() + b"\n")


def init(cfg: dict, mode: str, code: str, status_w: int) -> None:
    """PID 1 of the new namespaces (or a plain parent without them): mounts, then run the worker, reap,
    report how it ended on the status pipe, exit (taking the whole PID namespace with it)."""
    layers = []
    if mode != "none":
        layers.append("namespaces: mount, network, pid, ipc, uts" + (" (user namespace)" if mode == "userns" else ""))
        layers += setup_mounts(cfg, cfg["uid"] if mode == "root" else 0)
    for layer in layers:
        _report(status_w, "layer", layer)
    pid = os.fork()
    if pid == 0:
        os._exit(run_worker(cfg, mode, code, status_w))
    os.close(0), os.close(1), os.close(2)  # init keeps only the status pipe
    while True:  # reap: the worker, and any orphans reparented to us
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if got == pid:
            if os.WIFSIGNALED(status):
                _report(status_w, "signal", os.WTERMSIG(status))
            else:
                _report(status_w, "exit", os.WEXITSTATUS(status))
            break
    os._exit(0)


def parse_config(argv: list[str]) -> dict:
    """key=value arguments; values that look like integers are integers (no json: it costs startup time)."""
    cfg = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        cfg[key] = int(value) if value.lstrip("-").isdigit() else value
    return cfg


def main() -> None:
    cfg = parse_config(sys.argv[1:])
    status_w = cfg["status_fd"]
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # if the parent dies, so do we
    with open(cfg["program"], encoding="utf-8") as f:
        code = f.read()
    mode = unshare_namespaces() if cfg["isolate"] else "none"
    pid = os.fork()  # the child is PID 1 of the new PID namespace
    if pid == 0:
        try:
            init(cfg, mode, code, status_w)
        except BaseException as e:  # a setup failure: say so, never run the program half-locked
            _report(status_w, "error", f"sandbox setup: {type(e).__name__}: {e}")
            os._exit(125)
    os.close(status_w)
    _, status = os.waitpid(pid, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125)


if __name__ == "__main__":
    main()

"""The sandbox's child side. Never imported: runner.py runs it as

    python -I -S -X utf8 nanoseek/sandbox/child.py key=value ...

as the first code of a fresh interpreter, before any untrusted code. It locks the process down in layers,
each one that this machine permits (which ones took effect is reported to the parent on the status pipe):

  outer   (the process the parent started, in the parent's namespaces)
    unshare: new mount, network, PID, IPC and UTS namespaces. As root directly; otherwise inside a new
    user namespace (unprivileged user namespaces), where our uid is mapped to root. None permitted: the
    run is refused, unless the caller opted in with allow_unisolated=1. Then fork:
  init    (PID 1 of the new PID namespace)
    mounts, private to the namespace: a fresh /proc; Python's executable, its shared library and its
    standard library re-exposed read-only when they sit under a directory the sandbox user may not enter;
    /dev/null over the ctypes extension; then every mount read-only (mount_setattr, recursive); a
    size-limited, noexec tmpfs on /tmp holding the working directory /tmp/work; empty read-only tmpfs over
    the other world-writable directories. Then fork, wait, report, exit; when init exits the kernel kills
    everything left in the namespace.
  worker  (PID 2)
    rlimits (CPU time, address space, file size, open files, processes, no core files); as root, a fresh
    unprivileged uid/gid that owns nothing but the working directory; no capabilities; no_new_privs; a
    seccomp filter (pidfd_*, ptrace, process_vm_*, kill/tkill, tgkill of other processes, socket, mount,
    namespaces, keyrings, bpf, io_uring: EPERM); dies with its parent; then `execve` of a fresh
    `python -I -S` running boot.py with an empty environment: the program never shares an interpreter with
    this file (its ctypes, its libc handle, its frames). boot.py adds the audit hook and runs the program.

Unisolated (only with allow_unisolated=1): no namespaces and no mounts; the working directory is the
parent's temporary directory. As root the worker still takes a fresh uid (which owns only that directory),
so the kernel's permissions keep it from other users' files and processes; rlimits, no_new_privs, seccomp
and the audit hook as above. Not as root it runs as the trainer's user: only seccomp, rlimits and the audit
hook stand between it and the trainer's files.
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
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP = 1, 4, 22
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 24, 38, 47
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1
WORKDIR = "/tmp/work"  # the working directory inside the namespaces
SHARED_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")  # hidden under read-only tmpfs
# seccomp, x86_64 only (other architectures number their system calls differently; there the layer is
# reported absent): these fail with EPERM; tgkill is allowed for this process's own threads only.
AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, SYS_TGKILL = 0xC000003E, 0x40000000, 234
DENIED_SYSCALLS = {
    "socket": 41, "kill": 62, "ptrace": 101, "pivot_root": 155, "chroot": 161, "mount": 165, "umount2": 166,
    "init_module": 175, "tkill": 200, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313, "bpf": 321, "userfaultfd": 323,
    "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "pidfd_open": 434, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
}  # fmt: skip

PYTHON = os.path.realpath(sys.executable)  # resolved before the mounts hide the links to it
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def unshare_namespaces(cfg: dict) -> tuple[str, str]:
    """Enter new namespaces: ('root', ''), ('userns', '') or ('none', why not)."""
    if cfg.get("pretend_no_namespaces"):
        return "none", "namespaces switched off (pretend_no_namespaces)"
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if os.geteuid() == 0 and libc.unshare(flags) == 0:
        return "root", ""
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER | flags) == 0:
        for path, text in (
            ("/proc/self/setgroups", "deny"),
            ("/proc/self/uid_map", f"0 {uid} 1"),
            ("/proc/self/gid_map", f"0 {gid} 1"),
        ):
            with open(path, "w") as f:
                f.write(text)
        return "userns", ""
    return "none", f"unshare(CLONE_NEWUSER|NEWNS|NEWPID|NEWNET|...) failed: {os.strerror(ctypes.get_errno())}"


def _blocked_ancestor(path: str) -> str | None:
    """The highest directory above `path` that other users cannot enter, if any."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def python_files() -> list[str]:
    """What the fresh interpreter needs: its executable, its shared library (if any), its standard library."""
    files = {PYTHON}
    with open("/proc/self/maps") as f:
        files.update(line.split()[-1] for line in f if "/libpython" in line)
    return sorted(files | {p for p in sys.path if os.path.isdir(p)})


def expose_python(paths: list[str], uid: int) -> list[str]:
    """Make Python's files readable to `uid` when one sits under a directory it may not enter: cover that
    directory with an empty tmpfs and bind each back, read-only."""
    done = []
    paths = sorted(set(paths))
    paths = [d for d in paths if not any(d.startswith(o + "/") for o in paths)]  # outermost only
    by_block: dict[str, list[str]] = {}
    for d in paths:
        block = _blocked_ancestor(d) if uid != 0 else None
        if block:
            by_block.setdefault(block, []).append(d)
    for block, ds in by_block.items():
        fds = [os.open(d, os.O_PATH) for d in ds]  # reachable after the cover
        mount("tmpfs", block, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for d, fd in zip(ds, fds):
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(d, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(d), exist_ok=True)
                os.close(os.open(d, os.O_CREAT | os.O_WRONLY, 0o755))
            mount(f"/proc/self/fd/{fd}", d, None, MS_BIND | MS_REC)
            mount(None, d, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.close(fd)
            done.append(d)
    return done


def hide_ctypes() -> list[str]:
    """/dev/null over the ctypes extension modules: `import _ctypes` fails even with the audit hook off."""
    hidden = []
    for d in sys.path:
        for name in os.listdir(d) if os.path.isdir(d) else ():
            if name.startswith(("_ctypes.", "_ctypes_test.")) and name.endswith(".so"):
                try:
                    mount("/dev/null", f"{d}/{name}", None, MS_BIND)
                    hidden.append(name)
                except OSError:  # not fatal: the audit hook denies the import too
                    pass
    return hidden


class _MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def setup_mounts(cfg: dict, uid: int) -> list[str]:
    """In the new mount namespace (as its init): private propagation, fresh /proc, Python exposed, ctypes
    hidden, everything read-only, then a writable tmpfs /tmp with the working directory, and read-only
    covers over shared writable directories."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    layers = []
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        layers.append("fresh /proc")
    except OSError:
        pass
    exposed = expose_python(python_files(), uid)  # before /tmp is covered (the library may live anywhere)
    if exposed:
        layers.append("python re-exposed read-only: " + ", ".join(exposed))
    if hide_ctypes():
        layers.append("ctypes extension hidden")
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    args = (ctypes.c_long(AT_FDCWD), b"/", ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(32))
    if libc.syscall(SYS_MOUNT_SETATTR, *args) == 0:
        layers.append("every mount read-only")
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    mount("tmpfs", "/tmp", "tmpfs", flags, f"size={cfg['disk_bytes']},mode=0755")
    os.mkdir(WORKDIR, 0o700)
    os.chown(WORKDIR, uid, uid)
    layers.append(f"tmpfs workdir {WORKDIR} ({cfg['disk_bytes']} bytes, noexec)")
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


def set_limits(cfg: dict, own_uid: bool) -> list[str]:
    cpu = int(cfg["cpu_seconds"])
    limits = [
        ("RLIMIT_CPU", resource.RLIMIT_CPU, cpu, cpu + 1),
        ("RLIMIT_AS", resource.RLIMIT_AS, cfg["memory_bytes"], None),
        ("RLIMIT_FSIZE", resource.RLIMIT_FSIZE, cfg["file_bytes"], None),
        ("RLIMIT_NOFILE", resource.RLIMIT_NOFILE, cfg["open_files"], None),
        ("RLIMIT_CORE", resource.RLIMIT_CORE, 0, None),
    ]
    if own_uid:  # counted per (user namespace, uid): ours alone. Under the trainer's uid it would count all of it
        limits.append(("RLIMIT_NPROC", resource.RLIMIT_NPROC, cfg["max_processes"], None))
    for _, res, soft, hard in limits:
        resource.setrlimit(res, (soft, soft if hard is None else hard))
    return [name for name, *_ in limits]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_filter(pid: int) -> bool:
    """Install the seccomp filter (needs no_new_privs first). False where it is not available."""
    if os.uname().machine != "x86_64":
        return False
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, eperm = 0x7FFF0000, 0x00050001  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    prog = [(ld, 0, 0, 4), (jeq, "next", "deny", AUDIT_ARCH_X86_64), (ld, 0, 0, 0)]  # arch, then the number
    prog.append((jge, "deny", "next", X32_SYSCALL_BIT))
    prog += [(jeq, "deny", "next", nr) for nr in sorted(DENIED_SYSCALLS.values())]
    prog += [(jeq, "next", "allow", SYS_TGKILL), (ld, 0, 0, 16), (jeq, "allow", "deny", pid)]  # tgkill(pid, ..)
    at = {"allow": len(prog), "deny": len(prog) + 1}
    prog += [(ret, 0, 0, allow), (ret, 0, 0, eperm)]
    jump = lambda i, t: 0 if t == "next" or isinstance(t, int) else at[t] - i - 1  # noqa: E731
    code = (_SockFilter * len(prog))(
        *(_SockFilter(c, jump(i, t), jump(i, f), k) for i, (c, t, f, k) in enumerate(prog))
    )
    fprog = _SockFprog(len(prog), code)
    _check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0), "seccomp")  # SECCOMP_MODE_FILTER
    return True


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_bounding_set() -> None:
    """Empty the bounding and ambient capability sets (needs CAP_SETPCAP: before changing uid). With an
    empty bounding set not even an execve as (namespace) root gains capabilities."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # EINVAL: no such cap
            break
    libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets. Needed in a user namespace, where we are root
    of the namespace and could otherwise undo its mounts; as real root, changing uid already does it."""
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3, all zero
    _check(libc.capset(ctypes.byref(header), data), "capset")


def lock_down(cfg: dict, mode: str, workdir: str) -> list[str]:
    """In the worker, before the exec: working directory, limits, identity, no_new_privs, seccomp."""
    layers = []
    os.chdir(workdir)
    root = os.geteuid() == 0
    new_uid = root and (mode == "root" or mode == "none" and cfg.get("uid_reaches_python") == 1)
    layers += set_limits(cfg, own_uid=mode != "none" or new_uid)
    if mode != "none" or root:
        drop_bounding_set()
    if new_uid:
        uid = cfg["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from 0 to another uid: the kernel clears the capability sets
        layers.append(f"unprivileged uid {uid}")
    elif root and mode == "none":
        layers.append("UNISOLATED: still uid 0 (a fresh uid could not reach Python's files)")
    if mode != "none" or root:
        clear_capabilities()
        layers.append("no capabilities")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    layers.append("no_new_privs")
    if seccomp_filter(os.getpid()):
        layers.append("seccomp")
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # after setresuid, which clears it
    return layers


def run_worker(cfg: dict, mode: str, code: str, status_w: int) -> int:
    """PID 2: lock down, report, exec the fresh interpreter. Returns only if that failed."""
    try:
        program_fd = os.memfd_create("program", 0)  # before RLIMIT_FSIZE; inherited by the exec
        data, done = code.encode("utf-8", "surrogatepass"), 0
        while done < len(data):
            done += os.write(program_fd, data[done:])
        os.lseek(program_fd, 0, os.SEEK_SET)
        workdir = WORKDIR if mode != "none" else cfg["host_dir"]
        layers = lock_down(cfg, mode, workdir)
        for layer in layers:
            _report(status_w, "layer", layer)
        os.set_inheritable(status_w, True)
        args = [
            f"guard={cfg['audit_guard']}",
            f"workdir={workdir}",
            f"confine_reads={int(mode == 'none')}",
            f"program_fd={program_fd}",
            f"status_fd={status_w}",
        ]
        os.execve(PYTHON, [PYTHON, "-I", "-S", "-X", "utf8", "-c", cfg["boot_source"], *args], {})
    except BaseException as e:  # never run the program half-locked
        _report(status_w, "error", f"worker setup: {type(e).__name__}: {e}")
    return 125


def _report(fd: int, kind: str, text: object) -> None:
    """One status line for the parent: "layer <what>", "exit <n>", "signal <n>", "refused <why>" or "error <what>"."""
    os.write(fd, f"{kind} {text}".replace("\n", " ").encode() + b"\n")


def init(cfg: dict, mode: str, why: str, code: str, status_w: int) -> None:
    """PID 1 of the new namespaces (or a plain parent without them): mounts, then run the worker, reap,
    report how it ended on the status pipe, exit (taking the whole PID namespace with it)."""
    layers = []
    if mode != "none":
        layers.append("namespaces: mount, network, pid, ipc, uts" + (" (user namespace)" if mode == "userns" else ""))
        layers += setup_mounts(cfg, cfg["uid"] if mode == "root" else 0)
    else:
        layers.append(f"UNISOLATED: no namespaces ({why}); allowed by allow_unisolated")
        reach = [*python_files(), cfg["host_dir"]]
        if os.geteuid() == 0 and not any(map(_blocked_ancestor, reach)):
            cfg["uid_reaches_python"] = 1
            os.chown(cfg["host_dir"], cfg["uid"], cfg["uid"])  # the fresh uid's only writable directory
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # the worker may not open our /proc entries (the status pipe)
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
    with open(cfg["boot"], encoding="utf-8") as f:
        cfg["boot_source"] = f.read()
    mode, why = unshare_namespaces(cfg) if cfg["isolate"] else ("none", "isolate=False")
    if mode == "none" and not cfg["allow_unisolated"]:
        _report(status_w, "refused", why)
        os._exit(125)
    pid = os.fork()  # the child is PID 1 of the new PID namespace
    if pid == 0:
        try:
            init(cfg, mode, why, code, status_w)
        except BaseException as e:  # a setup failure: say so, never run the program half-locked
            _report(status_w, "error", f"sandbox setup: {type(e).__name__}: {e}")
            os._exit(125)
    os.close(status_w)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    _, status = os.waitpid(pid, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125)


if __name__ == "__main__":
    main()

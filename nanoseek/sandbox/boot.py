"""The first code of the fresh interpreter that runs the program. Never imported: the locked-down worker
(child.py) `execve`s

    python -I -S -X utf8 -c <this file's text> guard=1 workdir=/tmp/work program_fd=N status_fd=M

so nothing of the process that set the sandbox up survives into this one: no `ctypes`, no `libc` handle,
no module or frame of the sandbox's own setup. Its only inputs are the program text (read from a
descriptor, then closed) and these few arguments; the kernel layers (namespaces, uid, rlimits, seccomp)
were put in place before the exec and are inherited. Here it adds the Python layer: it removes the pidfd
functions (no audit event covers them), installs the audit hook (PEP 578), reports on the status
descriptor and closes it, then runs the program in a fresh `__main__` module. A program that walks its
frames up to this file finds only `os`, `sys`, and these functions: nothing that grants more than the
program already has.
"""

import os
import sys

_S_IFMT, _S_IFLNK, _S_IFDIR = 0o170000, 0o120000, 0o040000


def make_guard(workdir: str, library: tuple[str, ...], confine_reads: bool):
    """The audit hook. Everything it calls is bound here, so a program that replaces module or builtin
    attributes (os.path.abspath, builtins.isinstance, ...) does not change what it checks; its data are
    immutable and the function itself is held only by the interpreter's hook list. `confine_reads` (when
    no namespaces hide the rest of the machine): reads too stay in the working directory, Python's
    library, /proc/self and /dev/{null,zero,urandom}."""
    deny_exact = frozenset(
        "os.fork os.forkpty os.system os.exec os.spawn os.posix_spawn os.kill os.killpg os.symlink os.link "
        "pty.spawn subprocess.Popen gc.get_objects gc.get_referrers gc.get_referents sys._current_frames "
        "sys.setprofile sys.settrace os.mknod os.mkfifo os.chroot os.setns os.unshare sys.remote_exec".split()
    )
    deny_prefix = tuple(
        "socket. ctypes. _ctypes. subprocess. os.posix_spawn os.spawn os.exec resource. mmap. fcntl. "
        "winreg. _winapi. cffi.".split()
    )
    deny_import = frozenset(
        "ctypes _ctypes _ctypes_test _posixsubprocess _testcapi _testinternalcapi _testmultiphase "
        "_xxsubinterpreters _xxinterpchannels _interpreters mmap fcntl _multiprocessing multiprocessing pty "
        "_cffi_backend cffi posix _signal".split()
    )
    # the path is the file's or directory's: resolved against dir_fd (the last argument) when one is given
    path_events = {
        "os.remove": 1,
        "os.rmdir": 1,
        "os.mkdir": 2,
        "os.chmod": 2,
        "os.chown": 3,
        "os.utime": 3,
        "os.truncate": -1,
        "os.setxattr": -1,
        "os.removexattr": -1,
        "shutil.rmtree": 1,
        "os.chflags": -1,
        "os.lchflags": -1,
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    dir_flags = os.O_DIRECTORY | getattr(os, "O_PATH", 0)
    inside = workdir.rstrip("/") + "/"
    me = f"/proc/{os.getpid()}/"
    readable = (inside, me, *library, "/dev/null/", "/dev/zero/", "/dev/urandom/")
    # C functions and types, captured: os.fsdecode would look `fspath` up in the os module at call time
    fspath, getcwd, lstat, readlink = os.fspath, os.getcwd, os.lstat, os.readlink
    _isinstance, _str, _bytes, _int, _any, _oserror = isinstance, str, bytes, int, any, OSError
    denied = PermissionError

    def real(path, dir_fd=None) -> str:
        """`path` with every symbolic link resolved (the kernel's view, /proc's magic links included),
        relative to dir_fd's directory or the working directory; a trailing '/' so prefixes compare."""
        p = fspath(path)
        p = _bytes.decode(p, "utf-8", "surrogateescape") if _isinstance(p, _bytes) else _str(p)
        if not p.startswith("/"):
            base = readlink(f"/proc/self/fd/{dir_fd}") if _isinstance(dir_fd, _int) else getcwd()
            p = base + "/" + p
        todo, done, hops = [x for x in p.split("/") if x][::-1], [], 0
        while todo:
            part = todo.pop()
            if part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            here = "/" + "/".join(done + [part])
            try:
                is_link = lstat(here).st_mode & _S_IFMT == _S_IFLNK
            except _oserror:
                is_link = False
            if not is_link:
                done.append(part)
                continue
            hops += 1
            if hops > 40:
                raise denied("sandbox: too many symbolic links")
            target = readlink(here)
            if target.startswith("/"):
                done = []
            todo.extend([x for x in target.split("/") if x][::-1])
        return "/" + "/".join(done) + "/"

    def outside(path, dir_fd=None) -> bool:
        if _isinstance(path, _int):  # an already open descriptor
            return False
        return not real(path, dir_fd).startswith(inside)

    def other_process(r: str) -> bool:
        """/proc/<pid>/... of any process but this one (the kernel's PID namespace hides the others too)."""
        if not r.startswith("/proc/") or r.startswith(me):
            return False
        name = r[6:].split("/", 1)[0]
        return name.isdigit()

    def guard(event: str, args: tuple) -> None:
        if event in deny_exact or event.startswith(deny_prefix):
            raise denied(f"sandbox: {event} is not allowed")
        if event == "import" and args and _isinstance(args[0], _str):
            if args[0].split(".")[0] in deny_import:
                raise denied(f"sandbox: import of {args[0]} is not allowed")
            origin = args[1] if len(args) > 1 else None  # set when a compiled extension is loaded
            if _isinstance(origin, _str) and not _any(origin.startswith(d) for d in library):
                raise denied(f"sandbox: loading {origin!r} is not allowed (only the standard library)")
        elif event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            if _isinstance(path, _int):
                return
            writes = (_isinstance(flags, _int) and flags & write_flags) or (
                _isinstance(mode, _str) and _any(c in mode for c in "wax+")
            )
            r = real(path)
            if other_process(r):
                raise denied(f"sandbox: {path!r} belongs to another process")
            if r.startswith(inside):
                return
            if writes:
                raise denied(f"sandbox: writing {path!r} outside the working directory is not allowed")
            if confine_reads and not r.startswith(readable):
                raise denied(f"sandbox: reading {path!r} is not allowed (unisolated: reads are confined)")
            if mode is None:  # os.open: no descriptor of a directory outside, which dir_fd could write under
                try:
                    is_dir = lstat(r[:-1] or "/").st_mode & _S_IFMT == _S_IFDIR
                except _oserror:
                    is_dir = False
                if is_dir or _isinstance(flags, _int) and flags & dir_flags:
                    raise denied(f"sandbox: a descriptor of {path!r} (a directory outside) is not allowed")
        elif event in ("os.listdir", "os.scandir") and args and not _isinstance(args[0], _int):
            r = real(args[0] if args[0] is not None else ".")
            if other_process(r) or confine_reads and not r.startswith(readable):
                raise denied(f"sandbox: listing {args[0]!r} is not allowed")
        elif event in path_events and args:
            at = path_events[event]
            dir_fd = args[at] if 0 < at < len(args) else None
            if outside(args[0], dir_fd):
                raise denied(f"sandbox: {event} on {args[0]!r} outside the working directory is not allowed")
        elif event == "os.rename" and len(args) >= 2:
            src_fd, dst_fd = (args[2], args[3]) if len(args) >= 4 else (None, None)
            if outside(args[0], src_fd) or outside(args[1], dst_fd):
                raise denied(f"sandbox: {event} outside the working directory is not allowed")
        elif event == "object.__setattr__" and len(args) > 1 and args[1] in ("__code__", "__closure__"):
            raise denied("sandbox: replacing code objects is not allowed")

    return guard


def strip_pidfd() -> None:
    """pidfd_open and pidfd_send_signal raise no audit event: take them away (the seccomp filter denies
    the system calls too; re-importing posix or _signal to get them back is denied by the hook)."""
    for mod in ("posix", "os", "_signal", "signal"):
        m = sys.modules.get(mod)
        for name in ("pidfd_open", "pidfd_send_signal"):
            if m is not None and hasattr(m, name):
                delattr(m, name)


def _report(fd: int, kind: str, text: object) -> None:
    os.write(fd, f"{kind} {text}".replace("\n", " ").encode() + b"\n")


def main() -> None:
    cfg = dict(a.partition("=")[::2] for a in sys.argv[1:])
    status_fd, program_fd = int(cfg["status_fd"]), int(cfg["program_fd"])
    try:
        chunks = []
        while chunk := os.read(program_fd, 1 << 20):
            chunks.append(chunk)
        os.close(program_fd)
        code = b"".join(chunks).decode("utf-8", "surrogatepass")
        strip_pidfd()
        layers = ["fresh interpreter"]
        if cfg["guard"] == "1":
            library = tuple(os.path.realpath(p).rstrip("/") + "/" for p in sys.path if p)
            sys.addaudithook(make_guard(cfg["workdir"], library, cfg["confine_reads"] == "1"))
            layers.append("audit hook")
    except BaseException as e:  # never run the program half-locked
        _report(status_fd, "error", f"boot: {type(e).__name__}: {e}")
        os._exit(125)
    for layer in layers:
        _report(status_fd, "layer", layer)
    os.close(status_fd)
    main_module = type(sys)("__main__")
    main_module.__file__ = "program.py"
    main_module.__builtins__ = __builtins__
    sys.modules["__main__"] = main_module
    sys.argv = ["program.py"]
    status = 0
    try:
        exec(compile(code, "program.py", "exec"), main_module.__dict__)
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
    os._exit(status & 0xFF)


if __name__ == "__main__":
    main()

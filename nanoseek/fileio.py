"""Atomic writes: a file or a directory appears whole under its final name, or not at all.

Everything nanoseek saves (checkpoints, datasets, metrics summaries, reports, run configs) goes through
these, so a kill at any moment leaves either the previous version or the new one, never half of one:

    atomic_write_text(run / "report.md", text)
    atomic_write_json(run / "run.json", {"step": 3})
    atomic_write(run / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    with atomic_directory(run / "final") as tmp:    # build the directory under a temporary name
        save_pretrained(model, tmp)                 # renamed to run/final when the block ends without error

Files are created with the permissions an ordinary `open` would give them (0666 less the umask), not the
0600 of a temporary file. Imports: the standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems cannot open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file below `root`, then `root` itself."""
    for p in Path(root).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to fill a temporary file beside `path`, fsync it, then rename it to `path`."""
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; when the block ends without error, its files are
    fsynced and it is renamed to `path` (an existing `path` is replaced when `replace`, else it is an error).
    On error the temporary directory is removed and `path` is left as it was."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} exists")
            old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
            os.rename(final, old)  # two renames: at every moment one whole version exists under a name
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Write a directory so that it is either complete or absent, never half-written: every writer of nanotune
(model directories, adapters, training checkpoints, GGUF conversions) goes through `atomic_dir` (one file,
a GGUF export: `atomic_file`).

    with atomic_dir("out/adapter") as tmp:      # tmp = out/adapter.tmp, empty
        (tmp / "adapter_config.json").write_text(...)
    # now out/adapter holds exactly those files; an older out/adapter was replaced only after they were on disk

The files are written into a sibling temporary directory, fsynced (data, then the directory entries), and the
directory is renamed into place: rename is atomic on POSIX file systems, and the fsyncs make the rename
happen after the data reaches the disk, so a crash or power cut leaves either the old directory or the new one.
"""
import contextlib
import os
import shutil
from pathlib import Path


def fsync(path: Path):
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path):
    """fsync every file and directory below root (deepest first), then root."""
    for d, _, files in os.walk(root, topdown=False):
        for f in files:
            fsync(Path(d) / f)
        fsync(Path(d))


@contextlib.contextmanager
def atomic_dir(path, tmp=None):
    """Yield an empty temporary directory (`tmp`, default `<path>.tmp` beside it); when the block ends without an
    exception its contents become `path`. An existing `path` is moved aside only once the new directory is
    complete and on disk, then removed. On an exception the temporary directory is removed and `path` is
    untouched. A process killed inside the block leaves only the temporary directory behind."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    fsync(path.parent)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary file name beside `path` (`.<name>.tmp`); when the block ends without an exception the file
    is fsynced and renamed over `path`, so a reader (or a crash) sees the old file or the new one, never a torn
    one (e.g. a half-drawn loss.png). On an exception the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a crash's leftover
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)

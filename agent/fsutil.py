"""Files written and read safely: the one home of atomic writes, fsync, and root's own directory.

Every write is a new temporary file in the target's directory, created with
O_EXCL|O_NOFOLLOW under an unpredictable name (a planted symlink or file is never
followed or reused), given its mode with fchmod before anything is in it, fsynced, and
renamed over the target; then the directory is fsynced.

Root's files (the stub journal and its lock) live in a directory only root can write,
checked each time it is opened (owned by the caller, not a symlink, writable by no one
else) and used through its descriptor (`PrivateDir`): a file the unprivileged daemon can
write is never one root acts on.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from agent.errors import AgentError

O_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


class UnsafePath(AgentError):
    """A path is not what a privileged writer may trust (someone else's, a link, a FIFO...)."""


def fsync_dir(directory: Path | int) -> None:
    fd = (
        directory
        if isinstance(directory, int)
        else os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    )
    try:
        os.fsync(fd)
    finally:
        if not isinstance(directory, int):
            os.close(fd)


def _tmp_name(name: str) -> str:
    return f".{name}.dnstls-agent.{os.getpid()}.{secrets.token_hex(6)}"


def _write_new(name: str, data: bytes, mode: int, dir_fd: int | None) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` (a file or a symlink: the link itself) with `data`, atomically."""
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomic_at(dfd, path.name, data, mode=mode)
    finally:
        os.close(dfd)


def write_atomic_at(dir_fd: int, name: str, data: bytes, *, mode: int = 0o644) -> None:
    tmp = _tmp_name(name)
    try:
        _write_new(tmp, data, mode, dir_fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        fsync_dir(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)


def symlink_atomic(path: Path, target: str) -> None:
    """Replace `path` with a symlink to `target`, atomically."""
    tmp = path.with_name(_tmp_name(path.name))
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def read_bounded(name: str | Path, limit: int, *, dir_fd: int | None = None) -> bytes | None:
    """A regular file's content, at most `limit` bytes (UnsafePath beyond, or for a symlink,
    a FIFO, a device); None when there is none. Never blocks on a FIFO, never follows a link."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | O_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnsafePath(f"{name}: cannot open ({exc.strerror}; a symlink?)") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{name}: not a regular file")
        if st.st_size > limit:
            raise UnsafePath(f"{name}: {st.st_size} bytes, at most {limit}")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise UnsafePath(f"{name}: over {limit} bytes")
        return data
    finally:
        os.close(fd)


class PrivateDir:
    """A directory only its owner (root, for the stub) writes: made 0700 if missing, and
    refused when it is a symlink, someone else's, or writable by group or others."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> PrivateDir:
        path = self.path
        with contextlib.suppress(FileExistsError):
            os.makedirs(path.parent, mode=0o755, exist_ok=True)
            os.mkdir(path, 0o700)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | O_FLAGS)
        except OSError as exc:
            raise UnsafePath(f"{path}: cannot open as a directory ({exc.strerror})") from exc
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            os.close(fd)
            raise UnsafePath(
                f"{path}: owned by uid {st.st_uid}, mode {st.st_mode & 0o7777:o}: only its "
                f"owner (uid {os.geteuid()}) may write where it keeps what it acts on"
            )
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

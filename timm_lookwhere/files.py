"""Writing files that survive a kill: each file appears whole or not at all, and one writer per folder.

`replacing(path)` gives a temporary name beside `path` to write to, and renames it over `path` only
once the block succeeded; a crash or kill at any moment leaves the previous file (or none) intact.

`writer_lock(folder)` makes a process the folder's only writer while the block runs, so two processes
never interleave their appends or race on one file: a second one is refused with the holder's process
id and host. The lock is the operating system's, not a file's existence, so a killed holder leaves
nothing stale behind: it is released when its process ends, however it ends.
"""
import contextlib
import json
import os
import re
import socket
from typing import Iterator, Union

__all__ = ['replacing', 'writer_lock', 'FolderLockedError', 'LOCK_FILE']

LOCK_FILE = 'lock'  # in the locked folder; holds the holder's pid and host, for the refusal message
_TEMPORARY = re.compile(r'.+\.\d+\.tmp$')  # what `replacing` names its temporary files


@contextlib.contextmanager
def replacing(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Write to the yielded name; `path` is replaced by it, atomically, when the block ends without error.

        with replacing(path) as tmp:
            torch.save(state, tmp)

    The temporary name carries the process id, so two writers never write into one temporary file.
    """
    path = os.fspath(path)
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        yield tmp
        os.replace(tmp, path)  # atomic on POSIX and Windows within one file system
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's writer lock."""


@contextlib.contextmanager
def writer_lock(folder: Union[str, os.PathLike]) -> Iterator[str]:
    """Hold `folder` (created if missing) as this process's alone while the block runs; yields the lock file.

    Raises `FolderLockedError` naming the holder when another live process holds it. On taking the lock,
    the temporary files of `replacing` that a killed writer left in the folder are removed: with the
    lock held, no one else can be writing them.

    The lock is a POSIX record lock (fcntl.lockf): it belongs to this process, so data-loader workers
    forked from it do not keep it alive after the process is killed (a flock would be shared with them).
    Like every POSIX lock it is per process: a second lock of the folder from this same process succeeds,
    and the end of either releases both. Take it once per process.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncate before holding: the holder's id is inside
    try:
        _lock(fd)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        raise FolderLockedError(
            f'{folder} is in use: {holder} is writing there (lock {path}). Wait for it to end or stop it, '
            'or write to another folder') from None
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname())).encode())
        for name in os.listdir(folder):
            if _TEMPORARY.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, name))
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays, as deleting it would race with the next taker


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096))
        return f"process {holder['pid']} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its id yet
        return 'another process'


try:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError (EAGAIN or EACCES) when held
except ImportError:  # Windows: a lock on one byte far past the id, which stays readable
    import msvcrt

    def _lock(fd: int) -> None:
        os.lseek(fd, 1 << 20, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # OSError when held; released when the process ends

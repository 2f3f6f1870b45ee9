"""Writing files that survive a kill: each file appears whole or not at all, one writer per folder, one run per
run folder.

`replacing(path)` gives a temporary name beside `path` to write to, and renames it over `path` only
once the block succeeded; a crash or kill at any moment leaves the previous file (or none) intact.

`writer_lock(folder)` makes a process the folder's only writer while the block runs, so two processes
never interleave their appends or race on one file: a second one is refused with the holder's process
id and host. The lock is the operating system's, not a file's existence, so a killed holder leaves
nothing stale behind: it is released when its process ends, however it ends.

`RunFolder(path, record)` is the guard of a run's output folder (`lookwhere distill`, the recipes): the writer
lock for the run's life, taken before anything is written, and the settings that define the run in a JSON record,
which `setting_changes` holds a later start to: a change is refused (naming the old and the new value) unless
the caller's policy honours it.
"""
import contextlib
import json
import os
import re
import socket
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

__all__ = [
    'replacing', 'writer_lock', 'RunFolder', 'setting_changes', 'RunFolderError', 'FolderLockedError',
    'SettingsChangedError', 'LOCK_FILE', 'HONOURED', 'REFUSED',
]

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


class RunFolderError(ValueError):
    """The output folder given cannot take the run: a file stands there, another process writes there, or it holds
    a run with other settings. A command line reports it as an argument error."""


class FolderLockedError(RunFolderError, RuntimeError):
    """Another live process holds the folder's writer lock."""


class SettingsChangedError(RunFolderError):
    """A run started again in its folder with a setting that defines it changed."""


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


def _entries(folder: str) -> List[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096))
        return f"process {holder['pid']} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its id yet
        return 'another process'


HONOURED, REFUSED = 'honoured', 'refused'  # what a run started again does with a changed setting


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)  # (1, 2) and [1, 2] alike: the record is JSON


def setting_changes(
        recorded: Mapping[str, Any],
        settings: Mapping[str, Any],
        policy: Optional[Mapping[str, Tuple[str, str]]] = None,
        show: Callable[[str, Any], str] = lambda name, value: f'{name}={value!r}',
        same: Callable[[str, Any, Any], bool] = lambda name, old, new: _as_json(old) == _as_json(new),
        refusal: str = 'these settings cannot change within a run',
        way_out: str = '',
) -> Dict[str, List[Any]]:
    """The settings that differ from a run's record, as {name: [old, new]}, when every one may change; else a
    `SettingsChangedError` that names each refused one with its new and its old value.

    `policy` maps a name to (HONOURED or REFUSED, why); without a policy every change is refused. A name the
    record lacks (a setting added since the run began) is not compared. `show(name, value)` writes a setting as
    the user gives it; the message is `refusal`, one line per refused change, then `way_out`.
    """
    changed, refused = {}, []
    for name, new in settings.items():
        if name not in recorded or same(name, recorded[name], new):
            continue
        verdict, why = (policy or {}).get(name, (REFUSED, ''))
        if verdict == REFUSED:
            line = f'{show(name, new)} (the run has {show(name, recorded[name])})'
            refused.append(line + (f': {why}' if why else ''))
        changed[name] = [recorded[name], new]
    if refused:
        raise SettingsChangedError(f'{refusal}:\n  ' + '\n  '.join(refused) + (f'\n{way_out}' if way_out else ''))
    return changed


class RunFolder:
    """A run's output folder, held for the run's life: its writer lock, and the record of the settings that define
    the run (a JSON file in it).

        with RunFolder(output, 'run.json') as folder:  # a file there, or another live writer: RunFolderError
            recorded = folder.read_record()
            if recorded is None:
                folder.write_record(settings)
            else:
                setting_changes(recorded, settings)  # other settings: SettingsChangedError
            ...  # the run

    Nothing is written before the lock is held, so a refused start changes nothing. A start that fails before
    writing anything leaves nothing either: the lock file the guard made goes, and so does the folder it made.
    """

    def __init__(self, path: Union[str, os.PathLike], record: str, flag: str = '--output'):
        self.path = os.fspath(path)
        self.record_path = os.path.join(self.path, record)
        self.flag = flag  # how the user gave the folder, for the messages
        self._stack: Optional[contextlib.ExitStack] = None
        self._made = (False, False)  # (the folder, its lock file) made by this guard

    def __enter__(self) -> 'RunFolder':
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunFolderError(f'{self.flag} {self.path} is a file; give a folder (made if missing)')
        made_folder = not os.path.exists(self.path)
        self._made = made_folder, made_folder or not os.path.exists(os.path.join(self.path, LOCK_FILE))
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(writer_lock(self.path))
        return self

    def __exit__(self, *exc_info) -> None:
        stack, self._stack = self._stack, None
        made_folder, made_lock = self._made
        if exc_info[0] is not None and made_lock and _entries(self.path) == [LOCK_FILE]:
            os.remove(os.path.join(self.path, LOCK_FILE))  # still held: no one else can be using it
            stack.close()
            if made_folder:
                with contextlib.suppress(OSError):
                    os.rmdir(self.path)
            return
        stack.close()

    def read_record(self) -> Optional[Dict[str, Any]]:
        """The settings the run in this folder was started with; None for a new folder."""
        if not os.path.exists(self.record_path):
            return None
        try:
            with open(self.record_path) as f:
                return json.load(f)
        except ValueError as err:
            raise RunFolderError(
                f'{self.record_path} is not the JSON record of a run ({err}): it was edited or damaged; restore it, '
                f'or start a new run in another {self.flag}') from None

    def write_record(self, settings: Mapping[str, Any]) -> None:
        with replacing(self.record_path) as tmp, open(tmp, 'w') as f:
            json.dump(dict(settings), f, indent=2)


try:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError (EAGAIN or EACCES) when held
except ImportError:  # Windows: a lock on one byte far past the id, which stays readable
    import msvcrt

    def _lock(fd: int) -> None:
        os.lseek(fd, 1 << 20, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # OSError when held; released when the process ends

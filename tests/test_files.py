"""Files that survive a kill (timm_lookwhere.files): whole-or-nothing replacement, one writer per folder."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from timm_lookwhere import files
from timm_lookwhere.files import FolderLockedError, replacing, writer_lock

# Holds FOLDER's lock until killed; with 'fork', first forks a child that outlives it (as a data-loader
# worker does). files.py is loaded alone: importing the package (torch, timm) would take seconds.
HOLDER = '''
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location('files', sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
with files.writer_lock(sys.argv[2]):
    child = os.fork() if sys.argv[3:] == ['fork'] else None
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    time.sleep(60)
'''


def hold(folder, *extra):
    """A process holding `folder`; returns it and its forked child's pid (None without 'fork')."""
    proc = subprocess.Popen([sys.executable, '-c', HOLDER, files.__file__, str(folder), *extra],
                            stdout=subprocess.PIPE, text=True)
    child = proc.stdout.readline().strip()  # printed once the lock is held
    assert child, 'the holder did not start'
    return proc, (int(child) if child != 'None' else None)


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_second_writer_is_refused_by_name_and_a_killed_holders_lock_is_taken_over(tmp_path):
    proc, _ = hold(tmp_path)
    try:
        with pytest.raises(FolderLockedError, match=f'process {proc.pid} on host {socket.gethostname()}'):
            with writer_lock(tmp_path):
                pass
    finally:
        kill(proc)
    with writer_lock(tmp_path) as lock:  # its process is gone: nothing stale is left to clear by hand
        assert f'"pid": {os.getpid()}' in open(lock).read()


def test_the_lock_of_a_killed_holder_is_free_while_its_forked_children_live(tmp_path):
    proc, child = hold(tmp_path, 'fork')
    try:
        kill(proc)
        with writer_lock(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_taking_the_lock_removes_the_temporary_files_of_killed_writers(tmp_path):
    for name in ('last.pth', 'last.pth.123.tmp', 'notes.tmp'):
        (tmp_path / name).write_text(name)
    with writer_lock(tmp_path):
        assert sorted(os.listdir(tmp_path)) == ['last.pth', 'lock', 'notes.tmp']  # not a name `replacing` gives


def test_replacing_leaves_the_old_file_whole_when_the_write_fails(tmp_path):
    path = tmp_path / 'args.json'
    path.write_text('old')
    with pytest.raises(KeyboardInterrupt):
        with replacing(path) as tmp:
            open(tmp, 'w').write('half')
            raise KeyboardInterrupt
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['args.json']
    with replacing(path) as tmp:
        open(tmp, 'w').write('new')
    assert path.read_text() == 'new' and os.listdir(tmp_path) == ['args.json']

"""Files that survive a kill (timm_lookwhere.files): whole-or-nothing replacement, one writer per folder, and the
guard of a run folder (its lock, its record of settings, the refusal of changed ones)."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from timm_lookwhere import files
from timm_lookwhere.files import (
    HONOURED, REFUSED, FolderLockedError, RunFolder, RunFolderError, SettingsChangedError, replacing, setting_changes,
    writer_lock,
)

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


# --------------------------------------------------------------------------------------------
# the run folder guard


def test_a_run_folder_is_held_for_the_block_and_keeps_its_record(tmp_path):
    output = tmp_path / 'run'
    with RunFolder(output, 'run.json') as folder:
        assert folder.read_record() is None  # a new run
        folder.write_record(dict(tiny=True, overrides=dict(k_range=(0.1, 0.2))))
        proc = subprocess.run([sys.executable, '-c', HOLDER, files.__file__, str(output)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode != 0 and f'process {os.getpid()} on host' in proc.stderr  # held by this process
    with RunFolder(output, 'run.json') as folder:
        assert folder.read_record() == dict(tiny=True, overrides=dict(k_range=[0.1, 0.2]))
    assert sorted(os.listdir(output)) == ['lock', 'run.json']


def test_a_run_folder_refuses_a_file_and_a_damaged_record(tmp_path):
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(RunFolderError, match=f'--output {tmp_path / "a_file"} is a file; give a folder'):
        RunFolder(tmp_path / 'a_file', 'run.json').__enter__()
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'run.json').write_text('{"tiny": tr')
    with RunFolder(tmp_path / 'run', 'run.json') as folder:
        with pytest.raises(RunFolderError, match='run.json is not the JSON record of a run'):
            folder.read_record()


def test_a_start_that_fails_before_writing_leaves_nothing_behind(tmp_path):
    made, existing = tmp_path / 'made', tmp_path / 'existing'
    existing.mkdir()
    for output in (made, existing):
        with pytest.raises(KeyError):
            with RunFolder(output, 'args.json'):
                raise KeyError('a bad argument found after the lock')
    assert not made.exists() and os.listdir(existing) == []
    with pytest.raises(KeyError):  # what a start wrote stays
        with RunFolder(made, 'args.json') as folder:
            folder.write_record(dict(steps=2))
            raise KeyError('later')
    assert sorted(os.listdir(made)) == ['args.json', 'lock']


def test_changed_settings_are_refused_each_by_name_unless_honoured(tmp_path):
    recorded = dict(model='a', steps=2, k_range=[1, 2], lr=0.1)
    policy = dict(model=(REFUSED, 'the architecture'), steps=(HONOURED, 'train longer'), lr=(HONOURED, ''))
    settings = dict(model='a', steps=5, k_range=(1, 2), lr=0.2, added_since=True)  # a tuple equals its JSON list
    assert setting_changes(recorded, settings, policy) == dict(steps=[2, 5], lr=[0.1, 0.2])
    with pytest.raises(SettingsChangedError) as error:
        setting_changes(recorded, dict(settings, model='b', k_range=(1, 3)), policy,
                        show=lambda name, value: f'--{name} {value!r}', refusal='--resume X: these cannot change',
                        way_out='Start a new run.')
    assert str(error.value) == ("--resume X: these cannot change:\n  --model 'b' (the run has --model 'a'): the "
                                'architecture\n  --k_range (1, 3) (the run has --k_range [1, 2])\nStart a new run.')
    with pytest.raises(SettingsChangedError, match="steps=5 \\(the run has steps=2\\)"):  # no policy: all refused
        setting_changes(recorded, dict(recorded, steps=5))

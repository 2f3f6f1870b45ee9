"""Lazy registration: after `pip install` (or `pip install -e`), any interpreter that imports timm
finds the LookWhere models, while start-up loads neither torch nor timm."""
import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import _timm_lookwhere_autoload as autoload
from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
PTH_NAME = 'timm_lookwhere-autoload.pth'


def python(script, *flags, cwd, env=None):
    """A fresh interpreter, run outside the checkout so nothing is importable from it by accident."""
    return subprocess.run([sys.executable, *flags, '-c', textwrap.dedent(script)], cwd=cwd, env=env or os.environ,
                          capture_output=True, text=True, timeout=300)


def hooks(target='fake_target'):
    return [f for f in sys.meta_path if isinstance(f, autoload.PluginImportHook) and f.target == target]


# ---------------------------------------------------------------------------------------------
# this environment, as `pip install -e .` (CI) or `pip install .` left it


@pytest.mark.slow
def test_fresh_interpreter_creates_lookwhere_models_without_importing_the_package(tmp_path):
    result = python(f"""
        import timm
        model = timm.create_model('lookwhere_vitb_518', **{TINY!r})
        print(type(model).__module__, type(model).__name__)
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['timm_lookwhere.lookwhere', 'LookWhere']


def test_start_up_only_adds_a_finder_and_imports_neither_torch_nor_timm(tmp_path):
    result = python("""
        import sys
        print(sorted(m for m in ('torch', 'timm', 'timm_lookwhere', 'numpy') if m in sys.modules))
        print([(type(f).__name__, getattr(f, 'target', None)) for f in sys.meta_path if hasattr(f, 'target')])
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ['[]', "[('PluginImportHook', 'timm')]"]


def test_autoload_can_be_switched_off(tmp_path):
    result = python("""
        import sys
        print(sum(type(f).__name__ == 'PluginImportHook' for f in sys.meta_path))
    """, cwd=tmp_path, env=dict(os.environ, TIMM_LOOKWHERE_AUTOLOAD='0'))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '0'


# ---------------------------------------------------------------------------------------------
# the hook itself, on a stand-in target and plugin (no torch import needed)


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """`fake_target` (stands for timm) and `fake_plugin` (stands for timm_lookwhere, which imports timm
    and registers into it), importable from tmp_path; sys.meta_path and sys.modules restored after."""
    monkeypatch.setattr(sys, 'meta_path', list(sys.meta_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ('fake_target', 'fake_plugin'):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in ('fake_target', 'fake_plugin'):
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


def write_package(root, name, source):
    (root / name).mkdir()
    (root / name / '__init__.py').write_text(textwrap.dedent(source))
    importlib.invalidate_caches()


TARGET_SRC = 'REGISTERED = []\n'
PLUGIN_SRC = 'import fake_target\nfake_target.REGISTERED.append("plugin")\n'


def test_importing_the_target_imports_the_plugin_once_and_removes_the_hook(fake_packages):
    write_package(fake_packages, 'fake_target', TARGET_SRC)
    write_package(fake_packages, 'fake_plugin', PLUGIN_SRC)
    autoload.install('fake_target', 'fake_plugin')
    autoload.install('fake_target', 'fake_plugin')  # a second install adds nothing
    assert len(hooks()) == 1
    import fake_target
    assert fake_target.REGISTERED == ['plugin'] and 'fake_plugin' in sys.modules
    assert hooks() == []
    # the target keeps its own loader, not the hook's wrapper
    assert type(fake_target.__loader__).__name__ == 'SourceFileLoader'
    assert fake_target.__spec__.loader is fake_target.__loader__


def test_importing_the_plugin_first_registers_once(fake_packages):
    write_package(fake_packages, 'fake_target', TARGET_SRC)
    write_package(fake_packages, 'fake_plugin', PLUGIN_SRC)
    autoload.install('fake_target', 'fake_plugin')
    import fake_plugin  # noqa: F401  (imports fake_target while itself half imported)
    assert sys.modules['fake_target'].REGISTERED == ['plugin']
    assert hooks() == []


def test_a_plugin_that_fails_to_import_warns_and_leaves_the_target_working(fake_packages):
    write_package(fake_packages, 'fake_target', TARGET_SRC)
    write_package(fake_packages, 'fake_plugin', 'raise ImportError("broken on purpose")\n')
    autoload.install('fake_target', 'fake_plugin')
    with pytest.warns(RuntimeWarning, match=r'fake_plugin could not register its models .*broken on purpose'):
        import fake_target
    assert fake_target.REGISTERED == []


def test_a_missing_target_fails_to_import_as_usual(fake_packages):
    autoload.install('fake_target', 'fake_plugin')
    with pytest.raises(ModuleNotFoundError, match="No module named 'fake_target'"):
        import fake_target  # noqa: F401
    assert len(hooks()) == 1  # still waiting, should the target appear later


def test_installing_after_the_target_was_imported_registers_at_once(fake_packages):
    write_package(fake_packages, 'fake_target', TARGET_SRC)
    write_package(fake_packages, 'fake_plugin', PLUGIN_SRC)
    import fake_target
    autoload.install('fake_target', 'fake_plugin')
    assert fake_target.REGISTERED == ['plugin'] and hooks() == []


# ---------------------------------------------------------------------------------------------
# packaging: what `pip install .` and `pip install -e .` put in site-packages


def copy_project(dst):
    """The files a build reads, so that building never writes into the shared checkout."""
    dst.mkdir()
    for name in ('pyproject.toml', 'setup.py', 'setup.cfg', 'README.md', f'{autoload.__name__}.py'):
        shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / 'timm_lookwhere', dst / 'timm_lookwhere', ignore=shutil.ignore_patterns('__pycache__'))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['wheel', 'editable'])
def test_wheel_ships_the_pth_file_that_hooks_timm_in_a_fresh_site(tmp_path, kind):
    project = copy_project(tmp_path / 'project')
    build = python(f"""
        from setuptools import build_meta
        print(build_meta.build_{kind}(r'{tmp_path / "dist"}'))
    """, cwd=project)
    assert build.returncode == 0, build.stderr
    wheel = tmp_path / 'dist' / build.stdout.split()[-1]
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read(PTH_NAME).decode() == f'import {autoload.__name__}; {autoload.__name__}.install()\n'
        record = zf.read(next(n for n in zf.namelist() if n.endswith('.dist-info/RECORD'))).decode()
        zf.extractall(tmp_path / 'site')  # a pure-Python wheel installs by unpacking it into site-packages
    assert PTH_NAME in record  # so that `pip uninstall` removes it

    # -S: no site-packages of this environment; `site.addsitedir` runs the unpacked wheel's .pth files
    # the way start-up runs those of site-packages
    result = python(f"""
        import importlib.util, site, sys
        site.addsitedir(r'{tmp_path / "site"}')
        print([f.target for f in sys.meta_path if type(f).__name__ == 'PluginImportHook'])
        print(sys.modules['{autoload.__name__}'].__file__)
        print(importlib.util.find_spec('timm_lookwhere').origin)
    """, '-S', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    targets, hook_file, package_file = result.stdout.splitlines()
    assert targets == "['timm']"
    # a wheel holds the code; an editable wheel points back to the project
    code_root = (tmp_path / ('site' if kind == 'wheel' else 'project')).resolve()
    assert Path(hook_file).resolve().is_relative_to(code_root)
    assert Path(package_file).resolve().is_relative_to(code_root)

"""Registers the LookWhere models with timm the first time a Python process imports timm.

Installing timm-lookwhere (`pip install .` in its source tree) puts `timm_lookwhere-autoload.pth` in
site-packages; Python's `site` module runs its one line at every start-up, which calls `install()`. That only puts a finder on
`sys.meta_path` (this module imports nothing but `sys` and `os`): processes that never use timm pay
under a millisecond (benchmarks/startup.py), and none of them loads torch or timm because of it. When
`timm` is first imported, the finder lets the normal import machinery load it, then imports
`timm_lookwhere`, whose import registers the models: `timm.create_model('lookwhere_vitb_518')` and
timm's own scripts work without importing this package.

Set TIMM_LOOKWHERE_AUTOLOAD=0 to turn it off; `import timm_lookwhere` registers the models anyway.
"""
import os
import sys

__all__ = ['install', 'uninstall', 'register', 'PluginImportHook']

TARGET = 'timm'
PLUGIN = 'timm_lookwhere'
DISABLE_ENV = 'TIMM_LOOKWHERE_AUTOLOAD'


def register(plugin: str = PLUGIN) -> None:
    """Import the plugin, whose import registers its models; never breaks the import of its target."""
    if plugin in sys.modules:  # already imported, or being imported (it imports timm itself)
        return
    import importlib
    import warnings
    try:
        importlib.import_module(plugin)
    except Exception as err:  # a broken plugin must not take timm down with it
        warnings.warn(
            f'{plugin} could not register its models ({type(err).__name__}: {err}); '
            f'run `python -c "import {plugin}"` for the full error, or set {DISABLE_ENV}=0 to skip this.',
            RuntimeWarning, stacklevel=2)


class _RegisterAfterExec:
    """Wraps the target's own loader: loads it as usual, then registers the plugin."""

    def __init__(self, loader, hook: 'PluginImportHook'):
        self.loader = loader
        self.hook = hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        uninstall(self.hook.target)  # one-shot: its job is done once the target starts loading
        # the target's modules should see its real loader (importlib.resources, reload, pickling)
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        register(self.hook.plugin)


class PluginImportHook:
    """A `sys.meta_path` finder that reacts to the import of one package (timm) and nothing else."""

    def __init__(self, target: str = TARGET, plugin: str = PLUGIN):
        self.target = target
        self.plugin = plugin

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.target:
            return None
        for finder in list(sys.meta_path):  # the spec the import system would find without this hook
            find_spec = getattr(finder, 'find_spec', None)
            if isinstance(finder, PluginImportHook) or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None  # not installed: let the import fail as usual
        if spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        spec.loader = _RegisterAfterExec(spec.loader, self)
        return spec


def install(target: str = TARGET, plugin: str = PLUGIN) -> None:
    """Register the plugin as soon as the target is imported (now, if it already is)."""
    if os.environ.get(DISABLE_ENV, '1') == '0':
        return
    if target in sys.modules:
        register(plugin)
    elif not any(isinstance(finder, PluginImportHook) and finder.target == target for finder in sys.meta_path):
        sys.meta_path.insert(0, PluginImportHook(target, plugin))


def uninstall(target: str = TARGET) -> None:
    sys.meta_path[:] = [
        finder for finder in sys.meta_path if not (isinstance(finder, PluginImportHook) and finder.target == target)]

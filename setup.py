"""Packaging hook; the metadata lives in pyproject.toml.

Ships `timm_lookwhere-autoload.pth` at the top of site-packages, for `pip install` and
`pip install -e` alike, so that any Python process that imports timm finds the LookWhere models
(see _timm_lookwhere_autoload.py).
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = 'timm_lookwhere-autoload.pth'
# `site` executes .pth lines that start with "import" at every start-up. The name sorts after
# setuptools' `__editable__.*.pth`, which must come first to make the module importable in -e installs.
PTH_LINE = 'import _timm_lookwhere_autoload; _timm_lookwhere_autoload.install()\n'


class BuildPyWithPth(build_py):
    """build_py that also writes the .pth file beside the top-level packages."""

    def run(self):
        super().run()
        # a regular wheel is packed from build_lib; an editable one from the folder `install`
        # would fill (setuptools leaves build_lib out of editable wheels)
        target_dir = self.get_finalized_command('install').install_lib if self.editable_mode else self.build_lib
        os.makedirs(target_dir, exist_ok=True)
        with open(os.path.join(target_dir, PTH_NAME), 'w', encoding='utf-8') as f:
            f.write(PTH_LINE)


setup(cmdclass={'build_py': BuildPyWithPth})

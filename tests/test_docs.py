"""The code examples of README.md and docs/*.md, run as written, so a page cannot drift from the code.

Sybil parses the pages. Each page runs top to bottom in a working directory of its own, its Python blocks
sharing one namespace as a reader's session would; a bash block runs in bash with this environment's
`python` and `lookwhere` first on PATH. A block that needs what an offline test machine lacks (the network,
a GPU, a clone of timm's scripts, the reader's own files, or minutes) follows a comment
`<!-- skip: next "what it needs" -->`, and pytest reports it skipped with that reason. A page's hidden set-up
(a stand-in for the reader's own data) is an `<!-- invisible-code-block: python -->` comment beside the block
that needs it.

The authors' weights are random ones in their layout: `pretrained=True` reads them from an offline Hugging Face
cache (tests/hub_cache.py), and each working directory holds `lookwhere_dinov2.pt` as `hf download` leaves it.
A reader with network gets the real files.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional
from unittest import SkipTest

import pytest
from huggingface_hub import constants
from sybil import Sybil
from sybil.evaluators.skip import Skipper
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

from hub_cache import write_cache

ROOT = Path(__file__).resolve().parent.parent
PAGES = ['README.md', *sorted(str(page.relative_to(ROOT)) for page in (ROOT / 'docs').glob('*.md'))]
AUTHORS_FILE = 'lookwhere_dinov2.pt'  # what the pages' `pretrained=True` on the authors' models loads
SHELL_TIMEOUT_S = 300


def run_shell(example) -> Optional[str]:
    """A bash block, stopped at its first failing command; Sybil reports a returned text as the failure."""
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get('PATH', '')]))
    result = subprocess.run(['bash', '-e', '-o', 'pipefail', '-c', str(example.parsed)], env=env,
                            capture_output=True, text=True, timeout=SHELL_TIMEOUT_S)
    if result.returncode:
        return f'exit status {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}'


DOCS = Sybil(parsers=[PythonCodeBlockParser(), CodeBlockParser('bash', run_shell), SkipParser()])


class Page:
    """A page's examples, evaluated in order; running one block first runs the blocks before it that have not
    run, so `-k` can pick any block."""

    def __init__(self, path: str):
        self.path = path
        self.examples = list(DOCS.parse(ROOT / path).examples())
        self.done = 0  # examples evaluated so far
        self.workdir = None

    def code_blocks(self):
        """(line, index) of each code example (skip comments are not blocks of their own)."""
        return [(example.line, i) for i, example in enumerate(self.examples) if not _is_directive(example)]

    def run_through(self, index: int) -> None:
        for before in self.examples[self.done:index]:
            self.done += 1
            try:
                before.evaluate()
            except SkipTest:
                pass
            except Exception as err:
                raise AssertionError(f'{self.path}: the block at line {before.line}, which this one follows, '
                                     f'fails: {err}') from err
        self.done = max(self.done, index + 1)
        example = self.examples[index]
        try:
            example.evaluate()
        except SkipTest as skip:
            pytest.skip(f'{self.path}:{example.line} {skip}')
        finally:
            if self.done == len(self.examples):  # the page's models go with it
                example.namespace.clear()


def _is_directive(example) -> bool:
    return isinstance(example.region.evaluator, Skipper)  # a skip comment, which acts on the block after it


PAGE_STATE = {path: Page(path) for path in PAGES}


@pytest.fixture(scope='module')
def authors_hub(tmp_path_factory):
    """A Hugging Face cache holding the authors' file, random weights in their layout."""
    cache = tmp_path_factory.mktemp('hub')
    write_cache(str(cache), filenames=[AUTHORS_FILE])
    return cache


@pytest.fixture
def page_environment(authors_hub, tmp_path_factory, monkeypatch):
    """Offline Hub reads from `authors_hub`; returns a function that enters a page's working directory."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(authors_hub))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)  # huggingface_hub reads these at call time
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(authors_hub))

    def enter(page: Page) -> None:
        if page.workdir is None:
            page.workdir = tmp_path_factory.mktemp(Path(page.path).stem)
            authors_file = next(authors_hub.glob(f'models--*/snapshots/*/{AUTHORS_FILE}'))
            (page.workdir / AUTHORS_FILE).symlink_to(authors_file.resolve())  # as `hf download ... --local-dir .`
        monkeypatch.chdir(page.workdir)
    return enter


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:This DataLoader will create:UserWarning')  # many-sizes.md's 4 workers, 2 cores
@pytest.mark.parametrize('path, index', [
    pytest.param(path, index, id=f'{path}:{line}') for path, page in PAGE_STATE.items()
    for line, index in page.code_blocks()])
def test_page_example_runs_as_written(path, index, page_environment):
    page = PAGE_STATE[path]
    page_environment(page)
    page.run_through(index)


def test_every_page_has_examples_and_every_skip_says_why():
    for path, page in PAGE_STATE.items():
        assert page.code_blocks(), f'{path} has no code block'
        for example in page.examples:
            if _is_directive(example):
                action, reason = example.region.parsed
                assert action == 'next' and reason and len(ast.literal_eval(reason)) > 20, \
                    f'{path}:{example.line}: a skip names what the block needs'


def test_a_bash_block_finds_the_package_commands_and_fails_with_its_output(tmp_path, monkeypatch):
    page = tmp_path / 'page.md'
    page.write_text('```bash\ncommand -v lookwhere\n```\n\n```bash\necho before\nfalse\necho after\n```\n')
    monkeypatch.chdir(tmp_path)
    runs, fails = DOCS.parse(page).examples()
    runs.evaluate()
    with pytest.raises(AssertionError, match=r'exit status 1\nbefore\n\n'):
        fails.evaluate()

"""A Hugging Face cache holding a file for every lookwhere_* tag that loads from the Hub: random weights
in the authors' layout at the size they publish, laid out as the Hub client leaves it. timm's own model
tests load them offline in CI (.ci/run):

    python tests/hub_cache.py DIR
    HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1 python -m pytest ...
"""
import os
import sys
import tempfile
from collections import defaultdict
from typing import Optional, Sequence

import torch

import timm
import timm_lookwhere  # noqa: F401  (registers the models)
from timm.models import get_pretrained_cfg, list_pretrained

from conftest import authors_layout, write_hub_snapshot


def half(tree):
    """fp16 copies of a nested dict of tensors: half the bytes to write and read; loading casts back."""
    return {k: half(v) if isinstance(v, dict) else v.half() for k, v in tree.items()}


def write_cache(cache: str, filenames: Optional[Sequence[str]] = None) -> list:
    """Write the files (only those named in `filenames`, when given); returns (repo, filename, architecture) for
    each."""
    files = defaultdict(list)  # (repo, filename) -> the tags that load it
    for name in list_pretrained('lookwhere_*'):
        cfg = get_pretrained_cfg(name)
        if cfg.hf_hub_id and cfg.hf_hub_filename and (filenames is None or cfg.hf_hub_filename in filenames):
            files[(cfg.hf_hub_id, cfg.hf_hub_filename)].append(name)
    written = []
    for repo in sorted({repo for repo, _ in files}):
        with tempfile.TemporaryDirectory() as folder:
            for (file_repo, filename), names in sorted(files.items()):
                if file_repo != repo:
                    continue
                # a file shared by several sizes is published at the largest (the weights' own)
                name = max(names, key=lambda n: get_pretrained_cfg(n).input_size[-1])
                torch.manual_seed(0)
                model = timm.create_model(name.split('.')[0], num_classes=0)
                torch.save(half(authors_layout(model)), os.path.join(folder, filename))
                written.append((repo, filename, name))
            write_hub_snapshot(cache, repo, folder)
    return written


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for repo, filename, name in write_cache(sys.argv[1]):
        print(f'{repo}/{filename}: random {name} weights in the authors\' layout')

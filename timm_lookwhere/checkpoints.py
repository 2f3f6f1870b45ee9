"""Checkpoint files: reading one with errors that name the file, and turning its layout into this project's.

The authors publish `torch.save`d nested dicts:
    ["selector"]["backbone"]  timm ViT state dict of the low-res selector
    ["selector"]["head"]      w1.weight, w1.bias, w2.weight, w2.bias (the map MLP)
    ["extractor"]             timm ViT state dict of the extractor (num_classes=0)
This project's models keep one flat state dict: `selector.backbone.*`, `selector.head.fc1/fc2.*`,
and the extractor at the top level as in timm's VisionTransformer (`patch_embed.*`, `pos_embed`,
`blocks.*`, `norm.*`, `head.*`). timm's train.py saves `state_dict` (and `state_dict_ema`) with its
arguments beside them.
"""
import argparse
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import safetensors
import safetensors.torch
import torch

from timm.models import clean_state_dict

__all__ = [
    'AUTHORS_HUB_ID', 'WEIGHTS_FILE_KINDS', 'read_weights_file', 'load_checkpoint_file', 'stored_num_classes',
    'infer_architecture', 'is_authors_layout', 'convert_authors_checkpoint', 'check_state_dict_keys',
    'weights_unavailable_message',
]

AUTHORS_HUB_ID = 'antofuller/lookwhere'

_HEAD_RENAMES = {'w1.': 'fc1.', 'w2.': 'fc2.'}
# The extractor's own class/register tokens are never used: the selector's prefix tokens replace them.
_UNUSED_EXTRACTOR_KEYS = ('cls_token', 'reg_token')


def is_authors_layout(checkpoint: Mapping[str, Any]) -> bool:
    return isinstance(checkpoint.get('selector'), Mapping) or isinstance(checkpoint.get('extractor'), Mapping)


def convert_authors_checkpoint(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Nested authors' layout -> this project's flat state dict."""
    selector = checkpoint.get('selector')
    extractor = checkpoint.get('extractor')
    missing = [name for name, part in (
        ('["extractor"]', extractor),
        ('["selector"]["backbone"]', (selector or {}).get('backbone') if isinstance(selector, Mapping) else None),
        ('["selector"]["head"]', (selector or {}).get('head') if isinstance(selector, Mapping) else None),
    ) if not isinstance(part, Mapping)]
    if missing:
        raise ValueError(
            f'checkpoint looks like the authors\' nested layout but lacks {", ".join(missing)}; '
            f'top-level keys are {sorted(checkpoint)}')
    flat = {}
    for key, value in extractor.items():
        if key not in _UNUSED_EXTRACTOR_KEYS:
            flat[key] = value
    for key, value in selector['backbone'].items():
        flat['selector.backbone.' + key] = value
    for key, value in selector['head'].items():
        for old, new in _HEAD_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        flat['selector.head.' + key] = value
    return flat


WEIGHTS_FILE_KINDS = (
    "a .safetensors file, or a torch.save'd .pth/.pt holding a dict: a state dict (parameter name -> tensor), "
    "the authors' nested layout, or a timm train.py checkpoint")


def read_weights_file(path: Union[str, os.PathLike], mmap: bool = False) -> Dict[str, Any]:
    """The dict a weights file holds, read without running pickled code (`weights_only`).

    Anything else raises an error that names the file and what a weights file holds: a missing file,
    a folder, an empty or truncated file, random bytes, a pickle of something other than a dict.
    `mmap=True` maps a .pth's tensors instead of reading them, to look at shapes cheaply.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f'{path} is a folder, not a weights file; pass the file inside it ({WEIGHTS_FILE_KINDS})')
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint file at {path} (working directory {os.getcwd()})')
    if path.stat().st_size == 0:
        raise ValueError(f'{path} is empty (0 bytes): an interrupted download or save? A weights file is '
                         f'{WEIGHTS_FILE_KINDS}')
    if path.suffix == '.safetensors':
        try:
            if mmap:  # the header alone, which also checks that the file holds every tensor it lists
                with safetensors.safe_open(str(path), framework='pt') as f:
                    return {key: f.get_slice(key) for key in f.keys()}
            return safetensors.torch.load_file(path, device='cpu')
        except Exception as err:  # safetensors raises its own (Rust) error class for every defect
            raise ValueError(f'{path} is not a complete .safetensors file ({err}): re-download or re-save it') from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its arguments as a Namespace
            checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, IndexError, KeyError, OSError) as err:
        # torch's own message advises weights_only=False, which would run whatever code the file holds
        blocked = re.search(r'GLOBAL ([\w.]+)', str(err)) if 'Weights only load failed' in str(err) else None
        if blocked:
            raise RuntimeError(
                f'{path}: weights_only=True blocked loading it: it pickles {blocked.group(1)}, not only tensors and '
                f'plain values, and this package never runs code from a file. Re-save the weights as a state dict of '
                f'tensors (safetensors, or torch.save(model.state_dict(), ...))') from None
        reason = 'it is truncated' if isinstance(err, EOFError) or 'central directory' in str(err) else \
            f'{type(err).__name__}: it does not unpickle to tensors and plain values'
        raise ValueError(f'{path} is not a readable PyTorch checkpoint ({reason}); a weights file is '
                         f'{WEIGHTS_FILE_KINDS}. Re-download or re-save it.') from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{path} holds a {type(checkpoint).__name__}, not a dict; a weights file is '
                         f'{WEIGHTS_FILE_KINDS}')
    return checkpoint


def load_checkpoint_file(
        path: Union[str, os.PathLike],
        use_ema: bool = False,
        mmap: bool = False,
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A checkpoint file -> (this project's flat state dict, what the file says about the model).

    Reads the authors' nested file, a flat state dict (.pth or .safetensors), and timm train.py
    checkpoints (`state_dict`, `state_dict_ema`, and `args`, whose model name, model_kwargs and
    image size become the defaults).
    """
    checkpoint = read_weights_file(path, mmap=mmap)
    meta = _train_args(checkpoint)
    if use_ema:
        if not isinstance(checkpoint.get('state_dict_ema'), dict):
            raise ValueError(f'--ema: {path} has no EMA weights (no "state_dict_ema"); keys: {sorted(checkpoint)}')
        state_dict = checkpoint['state_dict_ema']
    elif is_authors_layout(checkpoint):
        return convert_authors_checkpoint(checkpoint), meta
    else:
        state_dict = next((checkpoint[k] for k in ('state_dict', 'model') if isinstance(checkpoint.get(k), dict)),
                          checkpoint)
    return clean_state_dict(state_dict), meta  # clean: no DDP / torch.compile prefixes


def stored_num_classes(path: Union[str, os.PathLike], classifier: str = 'head') -> Optional[int]:
    """Classes of the classifier head a weights file holds (`classifier`: its module name, timm's pretrained cfg
    `classifier`; None without one), read cheaply; the file's defects raise as in `read_weights_file`."""
    state_dict, _ = load_checkpoint_file(path, mmap=True)
    head = state_dict.get(f'{classifier}.weight')
    shape = head.get_shape() if hasattr(head, 'get_shape') else getattr(head, 'shape', None)
    return int(shape[0]) if shape is not None and len(shape) == 2 else None


def _train_args(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """Model settings a timm train.py checkpoint records: arch, model_kwargs, img_size."""
    meta = {}
    if isinstance(checkpoint.get('arch'), str):
        meta['arch'] = checkpoint['arch']
    args = checkpoint.get('args')
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, dict):
        meta.setdefault('arch', args.get('model'))
        meta['model_kwargs'] = dict(args.get('model_kwargs') or {})
        if args.get('img_size'):
            meta['model_kwargs'].setdefault('img_size', args['img_size'])
        elif args.get('input_size'):
            meta['model_kwargs'].setdefault('img_size', tuple(args['input_size'][1:]))
    return {k: v for k, v in meta.items() if v}


def infer_architecture(state_dict: Dict[str, torch.Tensor]) -> str:
    """Which registered LookWhere a flat state dict belongs to: the selector's register tokens tell
    DINOv2 (4 registers) from Franca (none), the width ViT-B from ViT-S."""
    pos = state_dict.get('pos_embed')
    if not isinstance(pos, torch.Tensor) or 'selector.head.fc1.weight' not in state_dict:
        raise ValueError('cannot tell the architecture: not a LookWhere checkpoint (no pos_embed / selector head); '
                         'pass --model')
    if 'selector.backbone.reg_token' not in state_dict:
        return 'lookwhere_vitb_franca_518'
    return 'lookwhere_vits_518' if pos.shape[-1] == 384 else 'lookwhere_vitb_518'


def _short_list(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f' (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def check_state_dict_keys(state_dict: Mapping[str, Any], model: torch.nn.Module, ignore_prefix: str = 'head.'):
    """Raise a ValueError naming the missing and unexpected keys of a checkpoint of another layout."""
    expected = {k for k in model.state_dict() if not k.startswith(ignore_prefix)}
    given = {k for k in state_dict if not k.startswith(ignore_prefix)}
    missing, unexpected = expected - given, given - expected
    if missing or unexpected:
        lines = [f'checkpoint does not match {type(model).__name__}:']
        if missing:
            lines.append(f'  missing {len(missing)} keys: {_short_list(missing)}')
        if unexpected:
            lines.append(f'  unexpected {len(unexpected)} keys: {_short_list(unexpected)}')
        lines.append('  expected the authors\' nested layout (["selector"]["backbone"/"head"], ["extractor"]) '
                     'or this project\'s flat state dict for the same architecture')
        raise ValueError('\n'.join(lines))


def weights_unavailable_message(model_name: str, hub_id: str, filename: str) -> str:
    return (
        f'could not get the pretrained weights of {model_name}: {filename} from the Hugging Face Hub repo '
        f'{hub_id} is neither reachable nor in the local cache. Download it where there is network '
        f'(`hf download {hub_id} {filename}`, or copy the Hugging Face cache), then either point '
        f'HF_HOME at that cache or load the file directly: timm.create_model("{model_name}", pretrained=True, '
        f'pretrained_cfg_overlay=dict(file="/path/to/{filename}"))'
    )

"""Checkpoint layouts and where weights come from.

The authors publish `torch.save`d nested dicts:
    ["selector"]["backbone"]  timm ViT state dict of the low-res selector
    ["selector"]["head"]      w1.weight, w1.bias, w2.weight, w2.bias (the map MLP)
    ["extractor"]             timm ViT state dict of the extractor (num_classes=0)
This project's models keep one flat state dict: `selector.backbone.*`, `selector.head.fc1/fc2.*`,
and the extractor at the top level as in timm's VisionTransformer (`patch_embed.*`, `pos_embed`,
`blocks.*`, `norm.*`, `head.*`).
"""
from typing import Any, Dict, Iterable, Mapping

import torch

__all__ = [
    'AUTHORS_HUB_ID', 'is_authors_layout', 'convert_authors_checkpoint', 'check_state_dict_keys',
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

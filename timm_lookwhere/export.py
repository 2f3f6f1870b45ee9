"""Hugging Face Hub export: timm's Hub layout for LookWhere weights, and the upload.

    lookwhere convert lookwhere_dinov2.pt OUT_DIR          # the authors' file, architecture inferred
    lookwhere convert output/train/.../model_best.pth.tar OUT_DIR --ema   # a timm train.py checkpoint
    lookwhere push OUT_DIR ORG/NAME

OUT_DIR then holds what `timm.create_model("local-dir:OUT_DIR", pretrained=True)`,
`timm.create_model("hf-hub:ORG/NAME", pretrained=True)` and transformers' `AutoModel` /
`AutoModelForImageClassification.from_pretrained` read: `model.safetensors`, `config.json`
(architecture, num_classes, the k setting and the other construction arguments in model_args,
pretrained_cfg) and a model card `README.md`.

timm's own `save_for_hf` works on LookWhere models too, but writes num_classes into model_args,
which transformers' timm wrapper passes to `timm.create_model` a second time (a TypeError); this
export keeps num_classes at the top level only, where both libraries read it.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

import timm
from timm.models import is_model, save_for_hf
from timm.models._hub import generate_readme
from timm.utils import ParseKwargs

from .cli import positive_int
from .checkpoints import AUTHORS_HUB_ID, infer_architecture, load_checkpoint_file
from .lookwhere import LookWhere, checkpoint_filter_fn

__all__ = ['load_checkpoint_file', 'infer_architecture', 'model_from_checkpoint', 'export_for_hf', 'push_to_hub',
           'add_subcommand']

PAPER_URL = 'https://arxiv.org/abs/2505.18051'
CODE_URL = 'https://github.com/antofuller/lookwhere'
CITATION = """@misc{fuller2025lookwhereefficientvisualrecognition,
      title={LookWhere? Efficient Visual Recognition by Learning Where to Look and What to See from Self-Supervision},
      author={Anthony Fuller and Yousef Yassin and Junfeng Wen and Daniel G. Kyrollos and Tarek Ibrahim
              and James R. Green and Evan Shelhamer},
      year={2025},
      eprint={2505.18051},
      archivePrefix={arXiv},
      primaryClass={cs.CV},
      url={https://arxiv.org/abs/2505.18051},
}"""
_TEACHERS = {
    'lookwhere_vitb_518': 'DINOv2 ViT-B/14 with 4 registers',
    'lookwhere_vitb_franca_518': 'Franca ViT-B/14',
    'lookwhere_vits_518': 'a ViT-S/14 teacher (what-where distillation)',
}


# ------------------------------------------------------------------------------------------------
# reading checkpoints


def model_from_checkpoint(
        path: Union[str, Path],
        model_name: Optional[str] = None,
        use_ema: bool = False,
        **model_kwargs,
) -> LookWhere:
    """Build the model a checkpoint file describes and load it, classifier head included.

    `model_name` and `model_kwargs` override what the file records (train.py arguments) or implies.
    """
    state_dict, meta = load_checkpoint_file(path, use_ema=use_ema)
    model_name = model_name or meta.get('arch') or infer_architecture(state_dict)
    if not is_model(model_name) or not model_name.startswith('lookwhere_'):
        raise ValueError(f'{model_name!r} is not a LookWhere model; choose one of {timm.list_models("lookwhere*")}')
    recorded = dict(meta.get('model_kwargs', {}))
    if 'k' in model_kwargs or 'k_ratio' in model_kwargs:  # a k given now replaces the recorded one, either form
        recorded.pop('k', None)
        recorded.pop('k_ratio', None)
    kwargs = dict(recorded, **model_kwargs)
    head = state_dict.get('head.weight')
    num_classes = head.shape[0] if isinstance(head, torch.Tensor) else 0
    if kwargs.setdefault('num_classes', num_classes) != num_classes:
        raise ValueError(f'num_classes={kwargs["num_classes"]} but the checkpoint\'s head has {num_classes} classes')
    model = timm.create_model(model_name, **kwargs)
    state_dict = checkpoint_filter_fn(state_dict, model)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(f'{path} does not fit {model_name} built with {kwargs}: {err}') from None
    return model.eval()


# ------------------------------------------------------------------------------------------------
# writing timm's Hub layout


def _construction_args(model: LookWhere, config: Dict[str, Any]) -> Dict[str, Any]:
    args = dict(config.get('model_args', {}))
    # transformers' TimmWrapper passes num_classes itself; timm reads it from the top level too
    args.pop('num_classes', None)
    # k may have been changed with set_k since creation: record the current setting only
    args.pop('k', None)
    args.pop('k_ratio', None)
    if model.k_ratio is not None:
        args['k_ratio'] = model.k_ratio
    else:
        args['k'] = model.k
    return args


def model_card(model: LookWhere, config: Dict[str, Any], repo_id: str, source: Optional[str] = None) -> str:
    """A Hub model card: what the model is, its license, how to load it, where it comes from."""
    arch = config['architecture']
    rows, cols = model.grid_size
    num_params = sum(p.numel() for p in model.parameters())
    selector_params = sum(p.numel() for p in model.selector.parameters())
    classifier = model.num_classes > 0
    task = 'image-classification' if classifier else 'image-feature-extraction'
    details = {
        'Model Type': f'Image classification ({model.num_classes} classes)' if classifier else 'Image feature backbone',
        'Model Stats': {
            'Params (M)': f'{num_params / 1e6:.1f} (selector {selector_params / 1e6:.1f})',
            'Image size': f'{model.patch_embed.img_size[0]} x {model.patch_embed.img_size[1]}',
            'Patches seen by the extractor': f'k = {model.k} of {rows * cols} ({rows} x {cols} grid, patch '
                                             f'{model.patch_embed.patch_size[0]})',
            'Selector input': f'{model.selector.img_size[0]} x {model.selector.img_size[1]}, '
                              f'{len(model.selector.backbone.blocks)} blocks',
        },
        'Papers': {'LookWhere? Efficient Visual Recognition by Learning Where to Look and What to See from '
                   'Self-Supervision (NeurIPS 2025)': PAPER_URL},
        'Original': CODE_URL,
        'Pretrain Dataset': 'ImageNet-1k (what-where distillation from ' + _TEACHERS.get(arch, 'a ViT teacher') + ')',
    }
    if source:
        details['Weights'] = source
    k_arg = f'k_ratio={model.k_ratio}' if model.k_ratio is not None else f'k={model.k}'
    usage = f"""Needs the timm-lookwhere package, which registers the LookWhere architectures with timm (and with
transformers' timm wrapper), no import needed. It is not on PyPI: install it from its source tree,
`pip install PATH/TO/timm-lookwhere` (or a wheel built there with `pip wheel --no-deps PATH/TO/timm-lookwhere`).

```python
import timm, torch
from PIL import Image
image = Image.open("photo.jpg").convert("RGB")
model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()
config = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**config)   # {config['pretrained_cfg']['input_size'][1]} px, ImageNet mean/std
with torch.no_grad():
    out = model(transform(image).unsqueeze(0))        # {'logits' if classifier else 'pooled features'}
    dense = model.forward_dense(transform(image).unsqueeze(0))  # (1, {model.embed_dim}, {rows}, {cols}) for every patch
model.set_k(k=64)                                     # fewer patches, less compute (default {k_arg})
```

As a backbone: `timm.create_model("hf-hub:{repo_id}", pretrained=True, features_only=True, out_indices=(-1,))`
gives dense NCHW maps; `forward_intermediates` follows timm's ViT. With transformers:

```python
from transformers import {'AutoModelForImageClassification' if classifier else 'AutoModel'}, AutoImageProcessor
model = {'AutoModelForImageClassification' if classifier else 'AutoModel'}.from_pretrained("{repo_id}")
processor = AutoImageProcessor.from_pretrained("{repo_id}")
```
"""
    card = dict(
        tags=[task, 'timm', 'transformers', 'lookwhere'],
        license=config['pretrained_cfg'].get('license', 'mit'),
        description=(
            f'LookWhere `{arch}`: a low-res selector looks at a small copy of the image and scores every '
            f'high-res patch; the ViT extractor then embeds and processes only the k best of them, so the full '
            f'high-res image is never processed. The selector and the extractor were pre-trained together, '
            f'without labels, by distillation from {_TEACHERS.get(arch, "a ViT teacher")} '
            f'([paper]({PAPER_URL}), [authors\' code and weights]({CODE_URL}), MIT license).'),
        details=details,
        usage=usage,
        citation=CITATION,
    )
    return generate_readme(card, repo_id.split('/')[-1], task_name=task)


def export_for_hf(
        model: LookWhere,
        out_dir: Union[str, Path],
        repo_id: Optional[str] = None,
        source: Optional[str] = None,
        overwrite: bool = False,
) -> Path:
    """Write `model.safetensors`, `config.json` and a model card `README.md` to `out_dir`.

    `repo_id` (ORG/NAME) is what the card's code loads; `source` says where the weights come from. A folder
    that already holds files is refused unless `overwrite`, which replaces those three and leaves the rest.
    """
    if not isinstance(model, LookWhere):
        raise TypeError(f'expected a LookWhere model, got {type(model).__name__}')
    if not hasattr(model, 'pretrained_cfg'):
        raise TypeError('build the model with timm.create_model: the export needs the pretrained_cfg it records')
    out_dir = Path(out_dir)
    _check_export_target(out_dir, overwrite)
    save_for_hf(model, out_dir, safe_serialization=True)
    config_path = out_dir / 'config.json'
    config = json.loads(config_path.read_text())
    config['model_args'] = _construction_args(model, config)
    config_path.write_text(json.dumps(config, indent=2) + '\n')
    repo_id = repo_id or f'ORG/{out_dir.resolve().name}'
    (out_dir / 'README.md').write_text(model_card(model, config, repo_id, source), encoding='utf-8')
    return out_dir


EXPORT_FILES = ('model.safetensors', 'config.json', 'README.md')


def _check_export_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f'{out_dir} is a file, not a folder; choose a folder to write the export into')
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if present and not overwrite:
        replaced = [name for name in EXPORT_FILES if name in present]
        what = f'it would replace {", ".join(replaced)}' if replaced else f'it holds {", ".join(present[:8])}'
        raise FileExistsError(
            f'{out_dir} is not empty ({what}); choose an empty or new folder, or pass --overwrite '
            f'(overwrite=True) to replace {", ".join(EXPORT_FILES)} there and keep the other files')


# ------------------------------------------------------------------------------------------------
# upload


def check_export_folder(folder: Union[str, Path]) -> Dict[str, Any]:
    """The folder's config.json, if the folder holds an export this package can load; else a ValueError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f'{folder} is not a folder; make one with `lookwhere convert CHECKPOINT {folder}`')
    missing = [name for name in ('config.json', 'model.safetensors') if not (folder / name).is_file()]
    if missing:
        raise ValueError(f'{folder} lacks {" and ".join(missing)}; make it with `lookwhere convert`')
    config = json.loads((folder / 'config.json').read_text())
    if not str(config.get('architecture', '')).startswith('lookwhere_'):
        raise ValueError(
            f'{folder}/config.json is not a LookWhere export (architecture={config.get("architecture")!r})')
    return config


def push_to_hub(
        folder: Union[str, Path],
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Add LookWhere model',
) -> str:
    """Upload an export folder to the Hub model repo `repo_id` (created if needed); returns the commit URL."""
    check_export_folder(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f'bad repo id {repo_id!r}: {err}') from None
    if '/' not in repo_id:
        raise ValueError(f'give the repo as ORG/NAME (or USER/NAME), got {repo_id!r}')
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError('cannot upload: HF_HUB_OFFLINE is set; unset it where there is network')
    token = token or get_token()
    if not token:
        raise RuntimeError('cannot upload: no Hugging Face token. Run `hf auth login`, set HF_TOKEN, or pass --token '
                           '(a token with write access to ' + repo_id.split('/')[0] + ')')
    api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   commit_message=commit_message)
    except Exception as err:  # HTTP errors, and transport errors whose classes differ between hub versions
        raise RuntimeError(f'upload of {folder} to {constants.ENDPOINT}/{repo_id} failed: '
                           f'{type(err).__name__}: {err}') from err
    return str(getattr(commit, 'commit_url', commit))


# ------------------------------------------------------------------------------------------------
# command line


def _run_convert(args: argparse.Namespace) -> int:
    kwargs = dict(args.model_kwargs or {})
    for key in ('k', 'k_ratio'):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.img_size is not None:
        if len(args.img_size) > 2:
            print(f'lookwhere convert: error: --img-size takes S or H W, got {args.img_size}', file=sys.stderr)
            return 2
        kwargs['img_size'] = args.img_size[0] if len(args.img_size) == 1 else tuple(args.img_size)
    try:
        _check_export_target(Path(args.out_dir), args.overwrite)  # before the (possibly long) load
        model = model_from_checkpoint(args.checkpoint, model_name=args.model, use_ema=args.ema, **kwargs)
        source = args.source or (f'converted from {Path(args.checkpoint).name}' + (
            f' ({AUTHORS_HUB_ID})' if Path(args.checkpoint).name.startswith('lookwhere_') else ''))
        export_for_hf(model, args.out_dir, repo_id=args.repo_id, source=source, overwrite=args.overwrite)
    # OSError: a missing file, a folder given for a file, a folder that is not empty; RuntimeError: pickled code
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f'lookwhere convert: error: {err}', file=sys.stderr)
        return 2
    print(f'wrote {args.out_dir}: {model.pretrained_cfg["architecture"]}, {model.num_classes} classes, '
          f'k={model.k} of {model.num_patches} patches; '
          f'load it with timm.create_model("local-dir:{args.out_dir}", pretrained=True)')
    return 0


def _run_push(args: argparse.Namespace) -> int:
    try:
        url = push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                          commit_message=args.commit_message)
    except (ValueError, RuntimeError) as err:
        print(f'lookwhere push: error: {err}', file=sys.stderr)
        return 1
    print(f'uploaded {args.folder} to {args.repo_id}: {url}')
    return 0


def add_subcommand(subparsers) -> None:
    convert = subparsers.add_parser(
        'convert', help='checkpoint -> timm Hub folder (model.safetensors, config.json, README.md)',
        description='Turn the authors\' file or a fine-tuned checkpoint into timm\'s Hub layout.')
    convert.add_argument('checkpoint', help='the authors\' lookwhere_*.pt, a train.py checkpoint, or a state dict')
    convert.add_argument('out_dir', help='folder to write')
    convert.add_argument('--model', default=None,
                         help='architecture (default: the one train.py recorded, or inferred from the weights)')
    convert.add_argument('--k', type=positive_int, default=None, help='patches the extractor sees')
    convert.add_argument('--k-ratio', type=float, default=None, help='or that number as a fraction of the patches')
    convert.add_argument('--img-size', type=int, nargs='+', default=None, help='input size: S or H W')
    convert.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                         help='other timm.create_model arguments, key=value')
    convert.add_argument('--ema', action='store_true', help='export the EMA weights of a train.py checkpoint')
    convert.add_argument('--repo-id', default=None, help='ORG/NAME the model card\'s examples load')
    convert.add_argument('--source', default=None, help='where the weights come from, for the model card')
    convert.add_argument('--overwrite', action='store_true',
                         help=f'write into a folder that already holds files, replacing {", ".join(EXPORT_FILES)}')
    convert.set_defaults(func=_run_convert)

    push = subparsers.add_parser('push', help='upload a converted folder to the Hugging Face Hub',
                                 description='Upload a `lookwhere convert` folder to a Hub model repo.')
    push.add_argument('folder', help='folder written by `lookwhere convert`')
    push.add_argument('repo_id', help='ORG/NAME of the Hub model repo (created if needed)')
    push.add_argument('--token', default=None, help='Hub token (default: HF_TOKEN or `hf auth login`)')
    push.add_argument('--private', action='store_true', help='create the repo private')
    push.add_argument('--revision', default=None, help='branch to push to')
    push.add_argument('--commit-message', default='Add LookWhere model')
    push.set_defaults(func=_run_push)

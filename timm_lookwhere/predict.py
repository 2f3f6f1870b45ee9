"""`lookwhere predict`: a model over a collection of image files, on one process or many (torchrun), and the
library API other engines call per batch.

    lookwhere predict photos/ --model lookwhere_vitt16_512.sparse_signs --output preds/
    lookwhere predict photos/ more.txt --model lookwhere_vitb_518.dinov2 --k 256 --features --output feats/
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id photos \\
        -m timm_lookwhere predict /shared/photos --model lookwhere_vitb_518 --output /shared/preds

Images are decoded into uint8 in DataLoader workers (`timm_lookwhere.images`) and stay uint8 until the model,
which normalises only the low-res copy and the k patches it looks at. A LookWhere model takes each image at its
own size (a list per batch); a fixed-size model gets it resized and cropped as its pretrained cfg says.

    predictor = Predictor.from_name('lookwhere_vitt16_512.sparse_signs')     # or Predictor(model)
    rows = predictor([read_image(path) for path in paths])   # uint8 (C, H_i, W_i) -> a dict per image
    prepared = [predictor.prepare(image) for image in images]  # the pre-processing step alone (in workers)
    rows = predictor.predict(prepared)                         # the model step alone

The output folder holds Parquet parts of one schema (`PREDICTION_COLUMNS`, `ERROR_COLUMNS`), written whole or not
at all, and `manifest.json` (what ran: settings, model, versions, counts, launches):

    OUT/predictions/part-00000.parquet   a row per image read (path, size, top-k classes, ...)
    OUT/errors/part-00000.parquet        a row per file that gave no image, with the reason (only parts that have one)
    OUT/dense/part-00000.safetensors     --dense: a (D, rows, cols) map per image, keyed by its index
    OUT/masks/part-00000/00000012.png    segmenters: the class of each pixel, per image

Part c holds the files c * part_size ... (c + 1) * part_size - 1 of the sorted list of inputs, so the parts of a
run do not depend on how many processes made them: ranks take the missing parts round-robin, and a run killed at
any moment and launched again with the same arguments (any number of processes) makes only the missing ones.

Exit codes: 0 every file predicted; 2 an argument error or a refused output folder (in use by another launch,
holding another run, or not a predict folder); 3 done, but some files gave no image (listed in OUT/errors);
4 --strict stopped at a file that gave no image. Under torchrun, which reports any code but 0 as a failure (and
launches again with --max-restarts), a run done with bad files exits 0: the summary and manifest.json count them.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import difflib
import functools
import hashlib
import json
import math
import numbers
import os
import platform
import socket
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision.transforms.v2.functional as TF
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import timm
from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config
from timm.data.transforms import str_to_interp_mode
from timm.models import (
    get_model_input_config, get_pretrained_cfg, load_model_config_from_hf, parse_model_name, split_model_name_tag,
)
from timm.utils import ParseKwargs

from .checkpoints import load_checkpoint_file, stored_num_classes
from .cli import non_negative_int, positive_int
from .files import RunFolder, RunFolderError, replacing, setting_changes
from .images import IMAGE_EXTENSIONS, ImageError, read_image
from .layers import normalize_pixels, per_channel
from .lookwhere import LookWhere, TopKSelect
from .native_size import capped_size
from .scenes import CLASS_NAMES, SEGMENTATION_CLASSES
from .segmentation import SHIPPED_SEGMENTERS, LookWhereSegmenter, create_segmenter, pixel_logits

__all__ = [
    'PREDICTION_COLUMNS', 'ERROR_COLUMNS', 'PREDICTION_SCHEMA', 'ERROR_SCHEMA', 'Predictor', 'Preprocess',
    'create_model', 'class_names', 'list_image_files', 'add_subcommand', 'main',
    'EXIT_OK', 'EXIT_USAGE', 'EXIT_BAD_FILES', 'EXIT_STRICT',
]

EXIT_OK, EXIT_USAGE, EXIT_BAD_FILES, EXIT_STRICT = 0, 2, 3, 4
MANIFEST = 'manifest.json'
PREDICTIONS, ERRORS, DENSE, MASKS = 'predictions', 'errors', 'dense', 'masks'
OUTPUT_ENTRIES = {MANIFEST, 'lock', PREDICTIONS, ERRORS, DENSE, MASKS}  # what a predict output folder holds
LIST_EXTENSIONS = ('.txt', '.lst', '.list')  # a text file of paths, one a line
MAX_AUTO_PART_SIZE = 1024
# the ranks of a launch wait for the slowest at its end; a dead one is noticed at once (its connections close)
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)
FORMAT = 'timm-lookwhere predict 1'

# --------------------------------------------------------------------------------------------
# the output's schema: one for every run; a column a run was not asked for is null


PREDICTION_COLUMNS: List[Tuple[str, pa.DataType, str]] = [
    ('index', pa.int64(), 'position of the file in the sorted list of inputs'),
    ('path', pa.string(), 'the file, as listed (a folder given joined with the name found in it)'),
    ('width', pa.int32(), 'image width in pixels as decoded, EXIF orientation applied'),
    ('height', pa.int32(), 'image height in pixels, likewise'),
    ('input_width', pa.int32(), 'width the model saw (after --max-pixels, or the resize of a fixed-size model)'),
    ('input_height', pa.int32(), 'height the model saw'),
    ('k', pa.int32(), 'patches the extractor looked at (LookWhere models; null for a model that sees them all)'),
    ('grid_rows', pa.int32(), 'rows of the high-res patch grid of the input (LookWhere models; padded sides count)'),
    ('grid_cols', pa.int32(), 'columns of that grid'),
    ('top_indices', pa.list_(pa.int32()), 'the --top-k most probable classes, best first (models with a classifier)'),
    ('top_names', pa.list_(pa.string()), 'their names, when the model knows them'),
    ('top_probs', pa.list_(pa.float32()), 'their softmax probabilities'),
    ('features', pa.list_(pa.float32()), '--features: the pooled features the classifier would see'),
    ('selection', pa.list_(pa.int32()), '--selection: the patch ids looked at, best first (row-major on the grid)'),
    ('dense_file', pa.string(), "--dense: the safetensors file (relative to the output) holding this image's "
                                '(D, grid_rows, grid_cols) map under the key str(index)'),
    ('mask_file', pa.string(), "segmenters: the PNG (relative to the output) of the input's pixel classes"),
]
ERROR_COLUMNS: List[Tuple[str, pa.DataType, str]] = [
    ('index', pa.int64(), 'position of the file in the sorted list of inputs'),
    ('path', pa.string(), 'the file, as listed'),
    ('kind', pa.string(), 'why it gave no image: ' + ', '.join(
        ['missing', 'folder', 'empty', 'not an image', 'truncated', 'too large', 'too small', 'unreadable'])),
    ('error', pa.string(), 'the message, with the way out'),
]


def _schema(columns: Sequence[Tuple[str, pa.DataType, str]]) -> pa.Schema:
    return pa.schema([pa.field(name, kind, metadata={'description': about}) for name, kind, about in columns])


PREDICTION_SCHEMA = _schema(PREDICTION_COLUMNS)
# what a Predictor's row holds before the model fills it in: the columns it knows, null (the caller adds the rest)
_ROW = {name: None for name, _, _ in PREDICTION_COLUMNS if name not in ('index', 'path', 'dense_file', 'mask_file')}
ERROR_SCHEMA = _schema(ERROR_COLUMNS)


# --------------------------------------------------------------------------------------------
# models


def _architecture(name: str) -> Optional[str]:
    """The registered architecture a model name builds (None where it cannot be told before building)."""
    if name in SHIPPED_SEGMENTERS:
        return SHIPPED_SEGMENTERS[name][0]
    source, model_id = parse_model_name(name)
    if source is None:
        return split_model_name_tag(model_id)[0]
    if source == 'hf-hub':
        return load_model_config_from_hf(model_id)[1]
    try:  # local-dir: the folder's config.json, as timm's save_for_hf writes it
        with open(os.path.join(model_id, 'config.json')) as f:
            return json.load(f).get('architecture')
    except (OSError, ValueError):
        return None  # timm names the problem when it builds


def _classifier_name(architecture: Optional[str]) -> str:
    """The module name of an architecture's classifier, as its pretrained cfg gives it ('head' by default)."""
    cfg = timm.models.get_pretrained_cfg(architecture) if architecture and timm.is_model(architecture) else None
    classifier = (cfg.classifier if cfg is not None else None) or 'head'
    return classifier[0] if isinstance(classifier, (list, tuple)) else classifier


def create_model(
        name: str,
        pretrained: bool = True,
        checkpoint: Optional[str] = None,
        own_size: Optional[bool] = None,
        k: Optional[int] = None,
        k_ratio: Optional[float] = None,
        **kwargs,
) -> nn.Module:
    """The model `lookwhere predict --model NAME` runs, in eval mode.

    Args:
        name: any timm name (with a pretrained tag), `hf-hub:ORG/NAME`, `local-dir:FOLDER`, or a shipped segmenter
            (`timm_lookwhere.segmentation.SHIPPED_SEGMENTERS`, e.g. 'lookwhere_vitt16_512.dense_signs').
        pretrained: load its registered weights (ignored with `checkpoint`).
        checkpoint: a weights file to load instead (its classifier's size is read from it).
        own_size: LookWhere models take each image at its own size (the default): made with
            dynamic_img_size=True, dynamic_img_pad=True; False keeps the model's fixed size.
        k, k_ratio: patches the extractor sees (LookWhere models), else the model's own setting.
        **kwargs: more `timm.create_model` arguments.
    """
    architecture = _architecture(name)
    _check_model_name(name, architecture)
    lookwhere = architecture is not None and architecture.startswith('lookwhere_')
    if lookwhere and own_size is not False:
        kwargs.setdefault('dynamic_img_size', True)
        kwargs.setdefault('dynamic_img_pad', True)
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f'--checkpoint {checkpoint} is not a file (working directory {os.getcwd()})')
    if pretrained or checkpoint is not None:
        _check_num_classes_kept(name, architecture, checkpoint, kwargs.get('num_classes'))
    if checkpoint is not None:
        kwargs['pretrained_cfg_overlay'] = dict(file=checkpoint)
        # the file's classifier is kept: timm drops one of another size than its cfg says (LookWhere's factory reads
        # the size itself)
        stored = None if lookwhere else stored_num_classes(checkpoint, _classifier_name(architecture))
        if stored is not None:
            kwargs.setdefault('num_classes', stored)
            kwargs['pretrained_cfg_overlay']['num_classes'] = stored
        pretrained = True
    if name in SHIPPED_SEGMENTERS:
        model = create_segmenter(name, pretrained=pretrained, **kwargs)
    elif checkpoint is not None:
        if not lookwhere:  # LookWhere's factory names a file of another layout itself
            _check_not_lookwhere_weights(checkpoint, name)
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except RuntimeError as err:  # load_state_dict's tens of lines, or timm's position-embedding resize
            lines = [line.strip()[:200] + (' ...' if len(line.strip()) > 200 else '')
                     for line in str(err).splitlines() if line.strip()]
            more = f' (and {len(lines) - 2} more)' if len(lines) > 2 else ''
            raise ValueError(f'--checkpoint {checkpoint} does not fit {name}: {" ".join(lines[:2])}{more}. Was it '
                             'saved from another architecture or size? Give the --model (and --model-kwargs) it was '
                             'saved with') from None
    else:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if k is not None or k_ratio is not None:
        if not isinstance(model, (LookWhere, LookWhereSegmenter)):
            raise ValueError(f'--k and --k-ratio set the patches a LookWhere model sees; {name} is a '
                             f'{type(model).__name__}, which sees them all')
        model.set_k(k=k, k_ratio=k_ratio)
    return model.eval()


def _check_model_name(name: str, architecture: Optional[str]) -> None:
    """A timm name with a typo in its architecture or its tag, named with the names nearest to it (timm says only
    'Unknown model' or 'Invalid pretrained tag')."""
    if name in SHIPPED_SEGMENTERS or parse_model_name(name)[0] is not None:
        return
    if not timm.is_model(architecture):
        known = timm.list_models() + timm.list_pretrained() + sorted(SHIPPED_SEGMENTERS)
        near = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
        hint = f'did you mean {", ".join(near)}?' if near else 'timm.list_models() lists them'
        raise ValueError(f'Unknown model ({name}): no timm architecture {architecture!r}; {hint}')
    tag = split_model_name_tag(name)[1]
    if tag and name not in timm.list_pretrained(f'{architecture}.*'):
        tags = timm.list_pretrained(f'{architecture}.*') + sorted(
            n for n in SHIPPED_SEGMENTERS if n.startswith(f'{architecture}.'))
        raise ValueError(f'{name}: {architecture} has no weights tagged {tag!r}; '
                         + (f'give one of {", ".join(tags)}' if tags else 'it has no tagged weights: give it untagged'))


def _check_num_classes_kept(name: str, architecture: Optional[str], checkpoint: Optional[str],
                            num_classes: Optional[int]) -> None:
    """`--model-kwargs num_classes=N` where the weights' classifier has another number of classes would replace it
    with a new, untrained one: predictions at random. 0 (no classifier: features only) is always fine."""
    if num_classes is None or num_classes == 0 or name in SHIPPED_SEGMENTERS:
        return
    if checkpoint is not None:
        stored, where = stored_num_classes(checkpoint, _classifier_name(architecture)) or 0, checkpoint
    elif parse_model_name(name)[0] is None and timm.is_model(architecture):
        cfg = get_pretrained_cfg(name)
        if cfg is None or cfg.num_classes is None:
            return
        stored, where = cfg.num_classes, name
    else:
        return  # hf-hub and local-dir weights say their classes when they load
    if num_classes != stored:
        held = f'a classifier of {stored} classes' if stored else 'no classifier (features only)'
        raise ValueError(f'--model-kwargs num_classes={num_classes}: the weights ({where}) hold {held}, so the model '
                         f'would get a new, untrained classifier of {num_classes} classes whose predictions mean '
                         'nothing. Drop num_classes (or give num_classes=0 and --features for features), or give '
                         f'weights trained for {num_classes} classes')


def _check_not_lookwhere_weights(checkpoint: str, name: str) -> None:
    """A LookWhere's weights given to another architecture: timm fails far inside, resizing position embeddings."""
    state_dict, _ = load_checkpoint_file(checkpoint, mmap=True)
    if any(key.startswith('selector.') for key in state_dict):
        raise ValueError(f"--checkpoint {checkpoint} holds a LookWhere's weights (selector.* keys), and {name} is "
                         'not a LookWhere: give --model the LookWhere architecture it was saved from (e.g. '
                         'lookwhere_vitb_518, with the --model-kwargs it was made with)')


def class_names(model: nn.Module) -> Optional[List[str]]:
    """Names of a model's classes (of its mask values, for a segmenter), where they can be known: the pretrained
    cfg's label names, the shipped sign models' classes, or ImageNet's for 1000, 11821 or 21841 classes."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    cfg = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    num_classes = getattr(model, 'num_classes', 0)
    if not num_classes:
        return None
    names, descriptions = cfg.get('label_names'), cfg.get('label_descriptions') or {}
    if isinstance(names, (list, tuple)) and len(names) == num_classes:
        return [descriptions.get(n, n) if isinstance(descriptions, dict) else n for n in names]
    if isinstance(model, LookWhereSegmenter):
        return list(SEGMENTATION_CLASSES) if num_classes == len(SEGMENTATION_CLASSES) and \
            cfg.get('tag') == 'dense_signs' else None
    if cfg.get('architecture') in ('lookwhere_vitt16_256', 'lookwhere_vitt16_512') and num_classes == len(CLASS_NAMES):
        return list(CLASS_NAMES)  # the shipped sign models (and the recipe's runs of them)
    subset = infer_imagenet_subset(model)
    if subset is not None:
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(num_classes)]
    return None


# --------------------------------------------------------------------------------------------
# the library API: pre-processing and the model, per batch


def _data_config(model: nn.Module) -> Dict[str, Any]:
    """timm's data config of a model (mean, std, interpolation, crop), at the size the model was built for (an
    img_size= call changes the model, not its pretrained cfg, from which timm reads the size)."""
    config = resolve_data_config(model=model)
    built = get_model_input_config(model).get('input_size')
    if built:
        config['input_size'] = tuple(built)
    return config


class Preprocess:
    """uint8 (C, H, W) image -> what the model takes, still uint8: at its own size (shrunk to about `max_pixels`
    when larger, aspect kept), or resized and cropped to the model's fixed size as its pretrained cfg says.

    Picklable and without the model: it runs in DataLoader workers. An image with fewer patches than a fixed k
    raises `ImageError` (kind 'too small').
    """

    def __init__(
            self,
            data_config: Dict[str, Any],
            own_size: bool,
            max_pixels: Optional[int] = None,
            patch_size: Optional[int] = None,
            topk: Optional[TopKSelect] = None,
    ):
        self.channels = data_config['input_size'][0]
        self.own_size = own_size
        self.max_pixels = max_pixels
        self.patch_size = patch_size
        self.topk = None if topk is None else TopKSelect(topk.k, topk.k_ratio)  # a copy: the model stays behind
        self.interpolation = str_to_interp_mode(data_config.get('interpolation', 'bicubic'))
        self.input_size = tuple(data_config['input_size'][1:])
        self.crop_pct = data_config.get('crop_pct') or 1.0
        self.crop_mode = data_config.get('crop_mode') or 'center'

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.dtype != torch.uint8:
            got = f'a {image.dtype} tensor of shape {list(image.shape)}' if isinstance(image, torch.Tensor) else \
                type(image).__name__
            raise TypeError(f'expected a uint8 (C, H, W) image (timm_lookwhere.images.read_image gives one), got {got}')
        if image.shape[0] != self.channels:
            if image.shape[-1] == self.channels:
                raise ValueError(f'expected a (C, H, W) image, got shape {list(image.shape)}: an (H, W, C) image? '
                                 'Give image.permute(2, 0, 1)')
            raise ValueError(f'the model takes {self.channels} channels, the image has {image.shape[0]}: read it '
                             f'with read_image(path, channels={self.channels})')
        if image.shape[-2] < 1 or image.shape[-1] < 1:
            raise ImageError(f'a {image.shape[-1]}x{image.shape[-2]} px image has no pixels', 'too small')
        if self.own_size:
            height, width = image.shape[-2:]
            if self.max_pixels is not None:
                new_width, new_height = capped_size((width, height), self.max_pixels)
                if (new_width, new_height) != (width, height):
                    image = TF.resize(image, [new_height, new_width], self.interpolation, antialias=True)
            self._check_k_fits(*image.shape[-2:])
            return image
        return self._resize_and_crop(image)

    def _check_k_fits(self, height: int, width: int) -> None:
        if self.topk is None:
            return
        rows, cols = -(-height // self.patch_size), -(-width // self.patch_size)
        k = self.topk.num_keep(rows * cols)
        if k > rows * cols:
            raise ImageError(f'{width}x{height} px is {rows * cols} patches of {self.patch_size} px, fewer than '
                             f'k={k}: give a --k-ratio, which follows the image size, or a smaller --k', 'too small')

    def _resize_and_crop(self, image: torch.Tensor) -> torch.Tensor:
        """As timm's eval transform: the sides scaled to input_size / crop_pct (shorter side for 'center', both for
        'squash', longer for 'border'), then the centre crop (padded where smaller)."""
        height, width = image.shape[-2:]
        scale_h, scale_w = (math.floor(s / self.crop_pct) for s in self.input_size)
        if self.crop_mode == 'squash':
            size = [scale_h, scale_w]
        elif self.crop_mode == 'center' and scale_h == scale_w:
            size = [scale_h]  # the shorter side, as torchvision's Resize(int) in timm's transform
        else:
            pick = min if self.crop_mode == 'border' else max
            scale = pick(scale_h / height, scale_w / width)
            size = [max(1, round(height * scale)), max(1, round(width * scale))]
        image = TF.resize(image, size, self.interpolation, antialias=True)
        return TF.center_crop(image, list(self.input_size))


def _amp_dtype(amp_dtype: Any) -> Optional[torch.dtype]:
    """torch.bfloat16 or torch.float16 (or their names), or None: the dtypes torch.autocast runs."""
    if amp_dtype is None:
        return None
    dtype = getattr(torch, amp_dtype, None) if isinstance(amp_dtype, str) else amp_dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f'amp_dtype must be torch.bfloat16 or torch.float16 (what torch.autocast runs in), got '
                         f'{amp_dtype!r}')
    return dtype


class Predictor:
    """A model as a function of uint8 images: `predictor(images) -> rows`, one dict per image.

    Rows hold the columns of `PREDICTION_COLUMNS` (less index, path and the file columns, which the caller knows)
    and, where asked, `dense` ((D, rows, cols) float tensor) and, for a segmenter, `mask` ((H, W) class ids of the
    input's pixels). Three steps, to run (and time) apart: `prepare` (per image, no model: in loader workers),
    `predict` (a batch of prepared images: the model), and `__call__`, both.

    An image's row does not depend on the batch it came in (at float tolerance): the model takes a list of images
    each at its own size, the padding of a batch masked.
    """

    def __init__(
            self,
            model: nn.Module,
            own_size: Optional[bool] = None,
            max_pixels: Optional[int] = None,
            top_k: int = 5,
            features: bool = False,
            selection: bool = False,
            dense: bool = False,
            device: Optional[torch.device] = None,
            amp_dtype: Optional[torch.dtype] = None,
            names: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            model: a LookWhere, a LookWhere segmenter, or any timm model (resized to its size, normalised here).
            own_size: images at their own size (default for a LookWhere made with dynamic_img_size and
                dynamic_img_pad, which it then requires); False resizes them to the model's size.
            max_pixels: at own size, shrink larger images to about this many pixels.
            top_k: classes per row.
            features: add pooled features; selection: the patches looked at; dense: the dense map per image.
            device: where the model runs (default: where its parameters are).
            amp_dtype: run under torch.autocast in this dtype.
            names: class names (default: `class_names(model)`).
        """
        self.model = model.eval()
        self.segmenter = isinstance(model, LookWhereSegmenter)
        self.backbone = model.backbone if self.segmenter else model
        self.lookwhere = isinstance(self.backbone, LookWhere)
        if not self.lookwhere and (selection or dense):
            raise ValueError(f'--selection and --dense need a LookWhere model; this is a {type(model).__name__}')
        dynamic = self.lookwhere and self.backbone.dynamic_img_size and self.backbone.dynamic_img_pad
        if own_size is None:
            own_size = dynamic
        if own_size and not dynamic:
            raise ValueError('images at their own size need a LookWhere made with dynamic_img_size=True, '
                             'dynamic_img_pad=True (create_model does so); or resize them to the model\'s size')
        if max_pixels is not None and not own_size:
            raise ValueError(f'--max-pixels caps images taken at their own size; this model takes '
                             f'{_data_config(self.backbone)["input_size"][1:]} images, to which every image '
                             'is resized')
        patch = self.backbone.patch_embed.patch_size[0] if self.lookwhere else None
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral)
                                       or max_pixels < patch * patch):
            raise ValueError(f'--max-pixels {max_pixels} is less than one {patch}x{patch} patch ({patch * patch} '
                             'pixels): every image would shrink to a patch or less; give at least '
                             f'{patch * patch}, or none to keep every image\'s size')
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(f'top_k (--top-k) is the classes per row, at least 1; got {top_k!r}')
        amp_dtype = _amp_dtype(amp_dtype)
        self.num_classes = 0 if self.segmenter else getattr(model, 'num_classes', 0)
        if not (self.num_classes or self.segmenter or features or selection or dense):
            raise ValueError('the model has no classifier head (num_classes=0: its weights give features only); ask '
                             'for --features (pooled), --dense or --selection')
        self.own_size, self.top_k = own_size, top_k
        self.features, self.selection, self.dense = features, selection, dense
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.amp_dtype = amp_dtype
        self.names = list(names) if names is not None else class_names(model)
        classes = model.num_classes if self.segmenter else self.num_classes
        if names is not None and classes and len(self.names) != classes:
            raise ValueError(f'{len(self.names)} class names for the {classes} classes of the model: give a name '
                             'per class (--class-names: one a line)')
        self.data_config = _data_config(self.backbone)
        channels = self.data_config['input_size'][0]
        self.mean = torch.tensor(per_channel(self.data_config['mean'], channels), device=self.device)  # (C,)
        self.std = torch.tensor(per_channel(self.data_config['std'], channels), device=self.device)
        topk = self.backbone.topk if self.lookwhere and own_size else None
        self.preprocess = Preprocess(self.data_config, own_size, max_pixels, patch, topk)

    @classmethod
    def from_name(
            cls,
            name: str,
            pretrained: bool = True,
            checkpoint: Optional[str] = None,
            own_size: Optional[bool] = None,
            k: Optional[int] = None,
            k_ratio: Optional[float] = None,
            model_kwargs: Optional[Dict[str, Any]] = None,
            **kwargs,
    ) -> 'Predictor':
        """`create_model(name, ...)` wrapped; `kwargs` go to the Predictor (device, top_k, features, ...)."""
        model = create_model(name, pretrained, checkpoint, own_size, k, k_ratio, **dict(model_kwargs or {}))
        return cls(model, own_size=own_size, **kwargs)

    @property
    def channels(self) -> int:
        return self.preprocess.channels

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """The pre-processing step of one uint8 (C, H, W) image (see `Preprocess`)."""
        return self.preprocess(image)

    def __call__(self, images: Sequence[torch.Tensor]) -> List[Dict[str, Any]]:
        """uint8 (C, H_i, W_i) images -> their rows (width and height are the images' own)."""
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            raise TypeError(f'expected a list of (C, H, W) images, got one image of shape {list(images.shape)}: '
                            'give [image]')
        rows = self.predict([self.prepare(image) for image in images])
        for row, image in zip(rows, images):
            row.update(width=int(image.shape[-1]), height=int(image.shape[-2]))
        return rows

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize_pixels(x, self.mean, self.std, x.dim() - 3)
        # in the weights' dtype (a bfloat16 model); under autocast float32 goes in, as autocast expects
        return x if self.amp_dtype else x.to(next(self.model.parameters()).dtype)

    @torch.no_grad()
    def predict(self, images: Sequence[torch.Tensor]) -> List[Dict[str, Any]]:
        """Prepared uint8 images -> their rows: the model step alone. A batch (one size) or a list (own sizes)."""
        if len(images) == 0:
            return []
        x = [image.to(self.device, non_blocking=True) for image in images]
        x = x if self.own_size else torch.stack(x)  # (B, C, H, W) at the model's size
        autocast = torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with autocast:
            out = self._run_lookwhere(x) if self.lookwhere else self._run_timm(x)
        rows = [dict(_ROW, input_width=int(image.shape[-1]), input_height=int(image.shape[-2])) for image in images]
        if self.lookwhere:
            for row, ids, (grid_rows, grid_cols) in zip(rows, out['indices'], out['grids']):
                row.update(k=int(ids.numel()), grid_rows=grid_rows, grid_cols=grid_cols)
                if self.selection:
                    row['selection'] = ids.cpu().tolist()
        if 'logits' in out:
            probs = out['logits'].float().softmax(-1)
            top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
            for row, classes, p in zip(rows, top.indices.cpu().tolist(), top.values.cpu()):
                row.update(top_indices=classes, top_probs=p.tolist(),
                           top_names=[self.names[c] for c in classes] if self.names else None)
        if self.features:
            for row, feature in zip(rows, out['features'].float().cpu()):
                row['features'] = feature.tolist()
        for key in ('dense', 'mask'):
            for row, value in zip(rows, out.get(key, ())):
                row[key] = value.cpu()
        return rows

    def _run_timm(self, x: torch.Tensor) -> Dict[str, Any]:
        features = self.model.forward_features(self._normalise(x))
        out = dict(logits=self.model.forward_head(features)) if self.num_classes else {}
        if self.features:
            out['features'] = self.model.forward_head(features, pre_logits=True)
        return out

    def _run_lookwhere(self, x) -> Dict[str, Any]:
        backbone = self.backbone
        everything = backbone.forward_all(x)  # uint8 in: the model normalises the low-res copy and the k patches
        tokens, patch_valid = everything['tokens'], everything.get('patch_valid')  # (B, P + k_max, D), (B, k_max)
        if isinstance(everything['indices'], list):  # a list of images: per image ids and grids
            indices, grids = everything['indices'], [tuple(g) for g in everything['grid_size']]
        else:
            indices, grids = list(everything['indices']), [tuple(everything['grid_size'])] * len(tokens)
        out: Dict[str, Any] = dict(indices=indices, grids=grids)
        if self.num_classes:
            out['logits'] = backbone.forward_head(tokens, patch_valid=patch_valid)
        if self.features:
            out['features'] = backbone.forward_head(tokens, pre_logits=True, patch_valid=patch_valid)
        if self.dense or self.segmenter:
            if self.segmenter:  # the segmenter's own fill of the grid (the learned one, where it has it)
                dense = self.model.dense_from_all(everything)
            else:
                prefix = backbone.num_prefix_tokens
                dense = [backbone.dense_from_tokens(tokens[i:i + 1, :prefix + ids.numel()], ids[None], grid)[0]
                         for i, (ids, grid) in enumerate(zip(indices, grids))]
            dense = list(dense)  # (D, rows_i, cols_i) each
            if self.dense:
                out['dense'] = [d.float() for d in dense]
            if self.segmenter:
                sizes = [image.shape[-2:] for image in x]
                cells = [self.model.head(d[None]) for d in dense]  # (1, num_classes, rows_i, cols_i)
                mask_dtype = torch.uint8 if self.model.num_classes <= 256 else torch.int32
                out['mask'] = [pixel_logits(c.float(), self.model.patch_size, size)[0].argmax(0).to(mask_dtype)
                               for c, size in zip(cells, sizes)]
        return out

    def settings(self) -> Dict[str, Any]:
        """What defines this predictor's rows (recorded in a run's manifest)."""
        backbone = self.backbone
        return dict(
            k=backbone.k if self.lookwhere and backbone.topk.k_ratio is None else None,
            k_ratio=backbone.topk.k_ratio if self.lookwhere else None,
            own_size=self.own_size, max_pixels=self.preprocess.max_pixels, top_k=self.top_k, features=self.features,
            selection=self.selection, dense=self.dense,
            amp=str(self.amp_dtype).replace('torch.', '') if self.amp_dtype else None,
            class_names=hashlib.sha256('\n'.join(self.names).encode()).hexdigest() if self.names else None,
        )


# --------------------------------------------------------------------------------------------
# inputs


def list_image_files(paths: Iterable[str], exclude: Optional[str] = None) -> List[str]:
    """Every file the paths name, sorted, each once: a folder's image files (recursively, by extension:
    `timm_lookwhere.images.IMAGE_EXTENSIONS`), every line of a text file of paths (.txt, .lst, .list; blank lines
    and # comments skipped; relative to the working directory), an image file itself. A listed path that is no
    image is kept: reading it records why. `exclude`: a folder not to look in (the output)."""
    found = set()
    skip = os.path.realpath(exclude) if exclude else None
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(root, d)) != skip]
                found.update(os.path.normpath(os.path.join(root, f)) for f in files
                             if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
        elif path.lower().endswith(LIST_EXTENSIONS) and os.path.isfile(path):
            try:
                with open(path, encoding='utf-8') as f:
                    found.update(os.path.normpath(line.strip()) for line in f
                                 if line.strip() and not line.lstrip().startswith('#'))
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f'{path} cannot be read as a text file of paths: {_reason(err)}; a list is UTF-8 '
                                 'text, a path a line') from None
        elif os.path.isfile(path) and os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            found.add(os.path.normpath(path))
        elif os.path.exists(path):
            raise ValueError(f'{path} is neither a folder, an image file ({", ".join(sorted(IMAGE_EXTENSIONS))}) nor a '
                             f'text file of paths ({", ".join(LIST_EXTENSIONS)})')
        else:
            raise ValueError(f'{path} does not exist (working directory {os.getcwd()})')
    return sorted(found)


class _Item(NamedTuple):
    index: int
    path: str
    image: Optional[torch.Tensor]  # prepared, uint8
    width: int
    height: int
    error: Optional[ImageError]


def _malloc_trim() -> Callable[[], Any]:
    """glibc's malloc_trim(0), or nothing where the C library has none (macOS, Windows, musl)."""
    try:
        return functools.partial(ctypes.CDLL('libc.so.6').malloc_trim, 0)
    except (OSError, AttributeError):
        return lambda: None


# Decoding images of many sizes frees and allocates blocks of tens of MB in turn; glibc keeps what it freed in
# pieces it cannot reuse for the next, larger frame, and a long run's memory creeps up (measured: 1.05 -> 1.14 GB
# over 1024 files on one process). Handing the freed pages back after each image and each batch keeps it flat.
release_freed_memory = _malloc_trim()


class _ImageFiles(Dataset):
    """(index, path) pairs -> decoded and prepared images, or why a file gave none."""

    def __init__(self, entries: Sequence[Tuple[int, str]], preprocess: Preprocess, pixel_limit: Optional[int]):
        self.entries, self.preprocess, self.pixel_limit = entries, preprocess, pixel_limit

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> _Item:
        release_freed_memory()  # what the previous image left
        index, path = self.entries[i]
        try:
            image = read_image(path, self.preprocess.channels, self.pixel_limit)
            height, width = image.shape[-2:]
            return _Item(index, path, self.preprocess(image), int(width), int(height), None)
        except ImageError as err:
            return _Item(index, path, None, 0, 0, ImageError(err.message, err.kind, path))


# --------------------------------------------------------------------------------------------
# a launch: one process, or one of torchrun's


@dataclasses.dataclass
class _Launch:
    """This process's place in a torchrun launch (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> '_Launch':
        env = os.environ
        return cls(int(env.get('RANK', 0)), int(env.get('WORLD_SIZE', 1)), int(env.get('LOCAL_RANK', 0)),
                   int(env.get('LOCAL_WORLD_SIZE', 1)))

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def start(self) -> None:
        if self.world_size > 1 and not dist.is_initialized():  # gloo carries the plan and the reports, never tensors
            dist.init_process_group('gloo', timeout=COLLECTIVE_TIMEOUT)

    def share(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> Optional[List[Any]]:
        """Every rank's value, on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size if self.lead else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class _StrictStop(Exception):
    def __init__(self, error: ImageError):
        super().__init__(str(error))
        self.error = error


# --------------------------------------------------------------------------------------------
# the output folder


def _part(chunk: int) -> str:
    return f'part-{chunk:05d}'


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _auto_part_size(num_files: int, world_size: int, batch_size: int) -> int:
    """About 8 parts per process, at least a batch and at most MAX_AUTO_PART_SIZE files: a kill loses little, and
    the parts spread evenly over the processes of this launch (a relaunch keeps them, whatever its process count)."""
    return int(min(max(MAX_AUTO_PART_SIZE, batch_size), max(batch_size, math.ceil(num_files / (8 * world_size)))))


def _versions() -> Dict[str, str]:
    import numpy
    import PIL
    import torchvision
    from . import __version__
    return dict(timm_lookwhere=__version__, timm=timm.__version__, torch=torch.__version__,
                torchvision=torchvision.__version__, pyarrow=pa.__version__, numpy=numpy.__version__,
                pillow=PIL.__version__, python=platform.python_version())


def _model_record(args: argparse.Namespace, predictor: Predictor) -> Dict[str, Any]:
    model, backbone = predictor.model, predictor.backbone
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    cfg = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    record = dict(
        name=args.model, checkpoint=args.checkpoint, pretrained=bool(args.pretrained or args.checkpoint),
        model_kwargs=dict(args.model_kwargs or {}), kind=type(model).__name__, architecture=cfg.get('architecture'),
        tag=cfg.get('tag'), num_classes=getattr(model, 'num_classes', None),
        parameters=sum(p.numel() for p in model.parameters()), mean=list(predictor.data_config['mean']),
        std=list(predictor.data_config['std']), own_size=predictor.own_size, class_names=predictor.names)
    if predictor.lookwhere:
        record.update(k=backbone.k, k_ratio=backbone.topk.k_ratio, patch_size=backbone.patch_embed.patch_size[0])
    if not predictor.own_size:
        record['input_size'] = list(predictor.data_config['input_size'])
    return record


def _open_output(args: argparse.Namespace, predictor: Predictor, launch: _Launch,
                 held: contextlib.ExitStack) -> Tuple[RunFolder, Dict[str, Any]]:
    """Rank 0, before anything is written: the folder's lock (held till the end of the launch), the inputs, the
    record of a run already there (its settings must match), the parts still missing. Returns the folder and the
    plan every rank gets."""
    foreign = sorted(set(os.listdir(args.output)) - OUTPUT_ENTRIES) if os.path.isdir(args.output) else []
    if foreign:  # refused before the lock: nothing is written into someone else's folder
        raise RunFolderError(f'--output {args.output} holds other things than a lookwhere predict run '
                             f'({", ".join(foreign[:5])}{", ..." if len(foreign) > 5 else ""}); give a new or '
                             'empty folder')
    with contextlib.ExitStack() as attempt:  # a refused start leaves no folder of its own making behind
        try:
            folder = attempt.enter_context(RunFolder(args.output, MANIFEST, flag='--output'))
        except OSError as err:
            raise RunFolderError(f'--output {args.output!r} cannot be made or written: {_reason(err)}; give a folder '
                                 'you can write to') from None
        plan = _plan(args, predictor, launch, folder)
        held.enter_context(attempt.pop_all())
    return folder, plan


def _plan(args: argparse.Namespace, predictor: Predictor, launch: _Launch, folder: RunFolder) -> Dict[str, Any]:
    manifest = folder.read_record()
    if manifest is not None and manifest.get('format') != FORMAT:
        raise RunFolderError(f'--output {args.output}: its {MANIFEST} is not a lookwhere predict run\'s; give a new or '
                             'empty folder')
    files = list_image_files(args.inputs, exclude=args.output)
    if not files:
        raise ValueError(f'no image files in {" ".join(args.inputs)} (image files end in '
                         f'{", ".join(sorted(IMAGE_EXTENSIONS))}; text files of paths in {", ".join(LIST_EXTENSIONS)})')
    inputs = dict(files=len(files), sha256=hashlib.sha256('\n'.join(files).encode()).hexdigest())
    settings = dict(
        model=args.model, checkpoint=_sha256(args.checkpoint) if args.checkpoint else None,
        pretrained=bool(args.pretrained or args.checkpoint), model_kwargs=dict(args.model_kwargs or {}),
        pixel_limit=args.pixel_limit, **predictor.settings(), inputs=inputs)
    if manifest is None:
        part_size = args.part_size or _auto_part_size(len(files), launch.world_size, args.batch_size)
        manifest = dict(format=FORMAT, settings=dict(settings, part_size=part_size), launches=[])
    else:
        recorded = manifest['settings']
        part_size = args.part_size or recorded['part_size']
        setting_changes(
            recorded, dict(settings, part_size=part_size), show=_show_setting,
            refusal=f'--output {args.output} holds a run with other settings, which its parts were made with',
            way_out='Launch it again as it was, or write to another --output')
    _remove_leftovers(args.output)
    num_parts = math.ceil(len(files) / part_size)
    done = set(os.listdir(os.path.join(args.output, PREDICTIONS))) if os.path.isdir(
        os.path.join(args.output, PREDICTIONS)) else set()
    pending = [c for c in range(num_parts) if f'{_part(c)}.parquet' not in done]
    for earlier in manifest['launches']:
        if earlier.get('status') == 'running':  # the lock is ours: it ended without saying so
            earlier['status'] = 'interrupted'
    manifest.update(
        status='running', model=_model_record(args, predictor), inputs=dict(inputs, paths=list(args.inputs)),
        parts=dict(size=part_size, count=num_parts), versions=_versions(),
        schema=dict(predictions={n: str(t) for n, t, _ in PREDICTION_COLUMNS},
                    errors={n: str(t) for n, t, _ in ERROR_COLUMNS}))
    manifest['launches'].append(dict(
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), status='running',
        processes=launch.world_size, parts_missing=len(pending)))
    folder.write_record(manifest)
    for sub, used in ((PREDICTIONS, True), (ERRORS, True), (DENSE, predictor.dense), (MASKS, predictor.segmenter)):
        if used:
            os.makedirs(os.path.join(args.output, sub), exist_ok=True)
    return dict(files=files, part_size=part_size, pending=pending, manifest=manifest)


def _show_setting(name: str, value: Any) -> str:
    if name == 'inputs':
        return f'inputs: {value["files"]} files (listing sha256 {value["sha256"][:12]})'
    if name in ('checkpoint', 'class_names') and value:
        return f'{name} with sha256 {value[:12]}'
    return f'{name}={value!r}'


def _remove_leftovers(output: str) -> None:
    """The temporary files of writers killed mid-write (files.replacing names them NAME.PID.tmp); with the lock
    held no writer of another launch is left to finish them."""
    for root, _, names in os.walk(output):
        for name in names:
            stem, _, pid = name[:-len('.tmp')].rpartition('.') if name.endswith('.tmp') else ('', '', '')
            if stem and pid.isdigit():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(root, name))


# --------------------------------------------------------------------------------------------
# the work of one process


def _write_table(rows: List[Dict[str, Any]], schema: pa.Schema, path: str) -> None:
    with replacing(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)


def _write_part(output: str, chunk: int, rows: List[Dict[str, Any]], errors: List[Dict[str, Any]],
                dense: Dict[str, torch.Tensor]) -> None:
    """A part's files; its predictions part last: its presence says the part is done."""
    name = _part(chunk)
    errors_path = os.path.join(output, ERRORS, f'{name}.parquet')
    if errors:
        _write_table(errors, ERROR_SCHEMA, errors_path)
    elif os.path.exists(errors_path):  # an earlier try's: those files read now
        os.remove(errors_path)
    if dense:
        with replacing(os.path.join(output, DENSE, f'{name}.safetensors')) as tmp:
            save_file(dense, tmp)
    _write_table(rows, PREDICTION_SCHEMA, os.path.join(output, PREDICTIONS, f'{name}.parquet'))


def _write_mask(output: str, chunk: int, index: int, mask: torch.Tensor) -> str:
    relative = f'{MASKS}/{_part(chunk)}/{index:08d}.png'  # as the column holds it, '/' on every system
    path = os.path.join(output, *relative.split('/'))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = mask.numpy().astype(np.uint8 if mask.dtype == torch.uint8 else np.uint16)
    with replacing(path) as tmp:
        Image.fromarray(pixels).save(tmp, format='PNG')
    return relative


def _predict_parts(args: argparse.Namespace, predictor: Predictor, plan: Dict[str, Any], launch: _Launch,
                   workers: int) -> Dict[str, Any]:
    """This rank's share of the missing parts (round-robin), each written whole as it completes."""
    files, part_size = plan['files'], plan['part_size']
    chunks = plan['pending'][launch.rank::launch.world_size]
    entries, batches, batch_chunk = [], [], []
    for chunk in chunks:  # batches never cross a part: a part's rows do not depend on what else this rank does
        first, end = chunk * part_size, min((chunk + 1) * part_size, len(files))
        offset = len(entries)
        entries += [(i, files[i]) for i in range(first, end)]
        for start in range(0, end - first, args.batch_size):
            batches.append(list(range(offset + start, offset + min(start + args.batch_size, end - first))))
            batch_chunk.append(chunk)
    report = dict(rank=launch.rank, host=socket.gethostname(), parts=0, images=0, predicted=0, errors=0)
    if not entries:
        return report
    loader = DataLoader(
        _ImageFiles(entries, predictor.preprocess, args.pixel_limit), batch_sampler=batches, num_workers=workers,
        collate_fn=list, pin_memory=predictor.device.type == 'cuda')
    remaining = {chunk: min((chunk + 1) * part_size, len(files)) - chunk * part_size for chunk in chunks}
    rows, errors, dense = [], [], {}
    desc = 'predict' if launch.world_size == 1 else f'predict (rank 0 of {launch.world_size}: its share)'
    with tqdm(total=len(entries), unit='img', desc=desc, disable=args.quiet or not launch.lead,
              dynamic_ncols=True) as progress:
        for batch, chunk in zip(loader, batch_chunk):
            release_freed_memory()
            bad = [item for item in batch if item.error is not None]
            if bad and args.strict:
                raise _StrictStop(bad[0].error)
            errors += [dict(index=item.index, path=item.path, kind=item.error.kind, error=item.error.message)
                       for item in bad]
            good = [item for item in batch if item.error is None]
            for item, row in zip(good, predictor.predict([item.image for item in good])):
                row.update(index=item.index, path=item.path, width=item.width, height=item.height)
                if 'dense' in row:
                    dense[str(item.index)] = row.pop('dense').contiguous()
                    row['dense_file'] = f'{DENSE}/{_part(chunk)}.safetensors'
                if 'mask' in row:
                    row['mask_file'] = _write_mask(args.output, chunk, item.index, row.pop('mask'))
                rows.append(row)
            remaining[chunk] -= len(batch)
            report['images'] += len(batch)
            report['errors'] += len(bad)
            report['predicted'] += len(good)
            progress.update(len(batch))
            progress.set_postfix(errors=report['errors'], refresh=False)
            if remaining[chunk] == 0:
                _write_part(args.output, chunk, rows, errors, dense)
                report['parts'] += 1
                rows, errors, dense = [], [], {}
    return report


# --------------------------------------------------------------------------------------------
# the end of a launch: what the output holds


def _count_output(output: str, num_parts: int) -> Dict[str, Any]:
    predictions = os.path.join(output, PREDICTIONS)
    done = [c for c in range(num_parts) if os.path.exists(os.path.join(predictions, f'{_part(c)}.parquet'))]
    predicted = sum(pq.read_metadata(os.path.join(predictions, f'{_part(c)}.parquet')).num_rows for c in done)
    by_kind: Dict[str, int] = {}
    errors_folder = os.path.join(output, ERRORS)
    error_rows: List[Dict[str, Any]] = []
    for name in sorted(os.listdir(errors_folder)) if os.path.isdir(errors_folder) else []:
        table = pq.read_table(os.path.join(errors_folder, name), columns=['path', 'kind', 'error'])
        error_rows += table.to_pylist()
    for row in error_rows:
        by_kind[row['kind']] = by_kind.get(row['kind'], 0) + 1
    return dict(parts_done=len(done), predicted=predicted, errors=len(error_rows), errors_by_kind=by_kind,
                error_rows=error_rows)


def _count(n: int, noun: str) -> str:
    return f'{n} {noun}' + ('' if n == 1 else 's')


def _finish(args: argparse.Namespace, folder: RunFolder, plan: Dict[str, Any], reports: List[Dict[str, Any]],
            seconds: float) -> int:
    """Rank 0, every rank done: the manifest's counts and this launch's entry, the summary; the exit code."""
    manifest = plan['manifest']
    num_parts = manifest['parts']['count']
    counts = _count_output(args.output, num_parts)
    error_rows = counts.pop('error_rows')
    complete = counts['parts_done'] == num_parts
    images = sum(r['images'] for r in reports)
    manifest['status'] = 'complete' if complete else 'incomplete'
    manifest['counts'] = dict(files=len(plan['files']), **counts)
    manifest['launches'][-1].update(
        status='finished', seconds=round(seconds, 3), images=images, parts_written=sum(r['parts'] for r in reports),
        hosts=sorted({r['host'] for r in reports}),
        by_rank=[{k: r[k] for k in ('rank', 'host', 'parts', 'images', 'errors')} for r in reports])
    folder.write_record(manifest)
    rate = f' ({images / seconds:.1f} images/s)' if seconds > 0 and images else ''
    processes = f' by {len(reports)} processes' if len(reports) > 1 else ''
    print(f'lookwhere predict: {images} images in {seconds:.1f} s{rate}{processes}; {args.output} holds '
          f'{counts["predicted"]} predictions of {len(plan["files"])} files ({_count(num_parts, "part")})'
          + (f'; {_count(counts["errors"], "file")} gave no image' if counts['errors'] else ''))
    if error_rows:
        shown = error_rows[:10]
        more = f'\n  ... and {len(error_rows) - len(shown)} more' if len(error_rows) > len(shown) else ''
        listed = '\n'.join(f'  {r["path"]}: {r["kind"]}: {r["error"]}' for r in shown)
        print(f'lookwhere predict: {_count(len(error_rows), "file")} gave no image (recorded in '
              f'{os.path.join(args.output, ERRORS)}):\n{listed}{more}', file=sys.stderr)
    if not complete:  # every rank reported its share done
        raise RuntimeError(f'{num_parts - counts["parts_done"]} parts of {args.output} are missing after every process '
                           'finished: were they removed meanwhile? Launch it again to make them')
    if counts['errors'] and 'TORCHELASTIC_RUN_ID' in os.environ:
        return EXIT_OK  # torchrun reports any other code as a failure, and with --max-restarts would launch again
    return EXIT_BAD_FILES if counts['errors'] else EXIT_OK


# --------------------------------------------------------------------------------------------
# command line


def _device(name: Optional[str], launch: _Launch) -> torch.device:
    if name is None:
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name!r} is not a device: give cpu, cuda or cuda:N') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'--device {name}: no CUDA device here; use --device cpu')
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f'--device {name}: this machine has {count} CUDA device{"s" if count > 1 else ""} '
                             f'(cuda:0 to cuda:{count - 1}); give one of them, or cuda for each process its own')
        if device.index is None:  # one GPU per process of a node
            device = torch.device('cuda', launch.local_rank % count)
        torch.cuda.set_device(device)
    elif device.type != 'cpu':
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as err:
            raise ValueError(f'--device {name}: {str(err).splitlines()[0]}; use --device cpu or cuda') from None
    return device


def _default_workers(launch: _Launch) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, min(8, cpus // launch.local_world_size))


def _build_predictor(args: argparse.Namespace, device: torch.device) -> Predictor:
    if args.amp_dtype == 'float16' and device.type != 'cuda':
        raise ValueError('--amp-dtype float16 needs a CUDA device; on a CPU use bfloat16')
    names = None
    if args.class_names:
        try:
            with open(args.class_names, encoding='utf-8') as f:
                names = [line.rstrip('\n') for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f'--class-names {args.class_names}: {_reason(err)}; give a UTF-8 text file of class '
                             'names, one a line') from None
    predictor = Predictor.from_name(
        args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, own_size=args.own_size, k=args.k,
        k_ratio=args.k_ratio, model_kwargs=args.model_kwargs, max_pixels=args.max_pixels, top_k=args.top_k,
        features=args.features, selection=args.selection, dense=args.dense, device=device,
        amp_dtype=getattr(torch, args.amp_dtype) if args.amp else None, names=names)
    if predictor.channels not in (1, 3):
        raise ValueError(f'{args.model} takes {predictor.channels} channels; lookwhere predict reads image files as '
                         'RGB (3 channels) or grey (1). Run such a model through the library: Predictor(model) on '
                         'your own uint8 (C, H, W) tensors')
    return predictor


def _reason(err: Exception) -> str:
    """What an OSError or a decoding error says, without Python's decoration."""
    if isinstance(err, UnicodeDecodeError):
        return f'not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at {err.start})'
    return getattr(err, 'strerror', None) or str(err)


def _refuse(message: str, say: bool) -> int:
    if say:
        print(f'lookwhere predict: error: {message}', file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    """`lookwhere predict` with parsed arguments, on this process (one of torchrun's, or alone); the exit code."""
    launch = _Launch.from_env()
    started = time.perf_counter()
    try:
        launch.start()
        try:
            if args.threads:
                torch.set_num_threads(args.threads)
            predictor = _build_predictor(args, _device(args.device, launch))
        except (ValueError, RuntimeError, OSError, TypeError) as err:
            return _refuse(str(err), launch.local_rank == 0)  # each node's first process says it
        with contextlib.ExitStack() as held:
            folder, plan = None, None
            if launch.lead:
                try:
                    folder, plan = _open_output(args, predictor, launch, held)
                except (RunFolderError, ValueError, OSError) as err:
                    plan = dict(error=str(err))
            plan = launch.share(plan)
            if 'error' in plan:
                return _refuse(plan['error'], launch.lead)
            workers = _default_workers(launch) if args.workers is None else args.workers
            report = _predict_parts(args, predictor, plan, launch, workers)
            reports = launch.gather(report)
            code = _finish(args, folder, plan, reports, time.perf_counter() - started) if launch.lead else None
            return launch.share(code)
    except _StrictStop as stop:
        print(f'lookwhere predict: error: {stop.error} (--strict: stopped at the first file that gives no image; '
              'the parts written so far stay, launch again without --strict to go on and record it)', file=sys.stderr)
        return EXIT_STRICT
    finally:
        launch.close()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument('inputs', nargs='+', metavar='PATH',
                        help='folders (searched recursively for image files), image files, text files of paths '
                             f'({", ".join(LIST_EXTENSIONS)}: one a line)')
    parser.add_argument('--output', required=True, metavar='DIR', help='output folder (made if missing)')
    group = parser.add_argument_group('model')
    group.add_argument('--model', required=True, metavar='NAME',
                       help="a timm name with optional .tag, hf-hub:ORG/NAME, local-dir:FOLDER, or a shipped "
                            f"segmenter ({', '.join(sorted(SHIPPED_SEGMENTERS))})")
    group.add_argument('--checkpoint', metavar='FILE', help='a weights file instead of the registered weights')
    group.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                       help='load the registered weights (default: yes)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                       help='more timm.create_model arguments')
    budget = group.add_mutually_exclusive_group()
    budget.add_argument('--k', type=positive_int, help="patches a LookWhere looks at (default: the model's)")
    budget.add_argument('--k-ratio', type=_fraction, help='or that number as a fraction of each image\'s patches')
    group.add_argument('--own-size', action=argparse.BooleanOptionalAction, default=None,
                       help='each image at its own size (default for LookWhere models); --no-own-size resizes to '
                            "the model's size, as other models always are")
    group.add_argument('--max-pixels', type=positive_int, metavar='N',
                       help='at own size, shrink images of more pixels to about N (aspect kept; N at least one '
                            'patch); smaller ones stay')
    group.add_argument('--class-names', metavar='FILE', help='a text file of class names, one a line')
    group = parser.add_argument_group('outputs')
    group.add_argument('--top-k', type=positive_int, default=5, help='classes per image (default: %(default)s)')
    group.add_argument('--features', action='store_true', help='the pooled features of each image')
    group.add_argument('--selection', action='store_true', help='the patch ids a LookWhere looked at')
    group.add_argument('--dense', action='store_true', help='dense maps (D, rows, cols), safetensors beside the parts')
    group.add_argument('--part-size', type=positive_int, metavar='N',
                       help='files per part (default: about 8 parts per process, at most '
                            f'{MAX_AUTO_PART_SIZE}; kept by later launches)')
    group = parser.add_argument_group('running')
    group.add_argument('--batch-size', type=positive_int, default=16, help='images per forward (default: %(default)s)')
    group.add_argument('--workers', type=non_negative_int, help='decoding processes (default: the CPUs of a process)')
    group.add_argument('--device', help='cpu, cuda, cuda:1 (default: cuda when there is one; under torchrun the '
                                        "process's local rank)")
    group.add_argument('--amp', action='store_true', help='mixed precision (torch.autocast)')
    group.add_argument('--amp-dtype', choices=['bfloat16', 'float16'], default='bfloat16',
                       help='its dtype (default: %(default)s)')
    group.add_argument('--threads', type=positive_int, help='torch threads of a process')
    group.add_argument('--pixel-limit', type=positive_int, metavar='N',
                       help="refuse images of more pixels (default: Pillow's decompression-bomb limit, 179 MP)")
    group.add_argument('--strict', action='store_true', help='stop at the first file that gives no image')
    group.add_argument('--quiet', action='store_true', help='no progress bar: the summary only (for logs)')
    return parser


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f'must be in (0, 1], got {value}')
    return value


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'predict', help='run a model over folders of images: Parquet parts of predictions, on one process or many',
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Optional[List[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog='lookwhere predict', description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())

""" `lookwhere demo` and `lookwhere show`: where a LookWhere model looks, drawn over the image.

    lookwhere demo                                   # a generated 512 px street scene, the shipped sign model, offline
    lookwhere demo --model lookwhere_vitt16_256.sparse_signs   # a 256 px scene: the sign is 1-2% of it
    lookwhere demo --image photo.jpg --model lookwhere_vitb_518    # the authors' weights (Hugging Face Hub)
    lookwhere show --model lookwhere_vitb_518 --checkpoint lookwhere_dinov2.pt --image photo.jpg
    lookwhere demo --dense                           # a dense scene (1-6 signs), the shipped segmenter's mask, offline

The figure shows, left, what the extractor sees (the chosen high-res patches, the rest dimmed) and,
right, the selector's map (softmax over the patches) with the chosen patches outlined; where the sign of
a generated scene would be too small to read, a third panel enlarges the patches around it. With --dense:
the chosen patches, the predicted mask and the true mask of a generated dense scene, side by side.
"""
import argparse
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

import timm
from timm.data import ImageNetInfo, resolve_data_config
from timm.utils import ParseKwargs

from .images import ImageError, read_image
from .scenes import AREA_RANGE, CLASS_NAMES, SEGMENTATION_CLASSES, WIDE_AREA_RANGE, generate_dense_scene, \
    generate_scene, patches_under_box
from .lookwhere import LookWhere, SelectionRecorder
from .teachers import create_dense_counterpart, create_teacher
from .cli import non_negative_int, positive_int
from .cost import median_latency_ms

__all__ = [
    'SIGNS_MODEL', 'DENSE_MODEL', 'load_image', 'to_input', 'draw_selection', 'draw_segmentation', 'figure_size',
    'add_subcommand',
]

SIGNS_MODEL = 'lookwhere_vitt16_512'  # the high-res one: where looking at few patches pays
SIGNS_TAG = 'sparse_signs'
DENSE_MODEL = 'lookwhere_vitt16_512.dense_signs'  # the shipped segmenter (timm_lookwhere.recipes.dense_signs)
# a colour per mask value: background none, then the 14 sign classes (distinct hues, none of them grey)
CLASS_COLOURS = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
    (128, 0, 0), (0, 0, 128)], dtype=np.float32)
# the shipped sign models and the scenes each was trained on (timm_lookwhere.recipes.sparse_signs --config 256 / 512)
SIGN_SCENES = {'lookwhere_vitt16_256': AREA_RANGE, 'lookwhere_vitt16_512': WIDE_AREA_RANGE}

PANEL_TARGET = 512  # images are shown enlarged by a whole factor up to about this side
ZOOM_TARGET = 384  # the panel around the sign, likewise
# a sign drawn smaller than this in the figure gets that panel: every sign of a 512 px scene (29-55 px),
# none of a 256 px one (58-110 px, enlarged 2x)
MIN_SIGN_PX = 56
MARGIN = 8
HEADER = 64
CHOSEN_COLOUR = (60, 255, 120)
ZOOM_COLOUR = (255, 220, 0)
_INFERNO = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# models


def _create(args: argparse.Namespace) -> nn.Module:
    kwargs = dict(args.model_kwargs or {})
    if not args.model.startswith('lookwhere_') or not timm.is_model(args.model):
        raise ValueError(
            f'--model {args.model} is not a LookWhere model; choose one of {timm.list_models("lookwhere_*")}')
    if args.checkpoint:
        if not os.path.exists(args.checkpoint):
            raise FileNotFoundError(f'--checkpoint {args.checkpoint} does not exist')
        kwargs['pretrained_cfg_overlay'] = dict(file=args.checkpoint)
    pretrained = args.pretrained or bool(args.checkpoint)
    model = timm.create_model(args.model, pretrained=pretrained, **kwargs)
    if not isinstance(model, LookWhere):
        raise ValueError(f'--model must be a LookWhere model, {args.model} is a {type(model).__name__}')
    if args.k is not None:
        model.set_k(k=args.k)
    elif args.k_ratio is not None:
        model.set_k(k_ratio=args.k_ratio)
    elif _is_signs_model(model):
        model.set_k(k_ratio=0.05)  # the shipped models' headline budget
    return model.eval()


def _is_signs_model(model: nn.Module) -> bool:
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    return cfg.get('architecture') in SIGN_SCENES and model.num_classes == len(CLASS_NAMES)


def class_names(model: nn.Module) -> Optional[Sequence[str]]:
    if _is_signs_model(model):
        return CLASS_NAMES
    if model.num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return None


# --------------------------------------------------------------------------------------------
# images


def load_image(path: str, size: Tuple[int, int]) -> Image.Image:
    """An image file, upright and in RGB, resized so it covers `size` (H, W), then cropped to it at the centre."""
    if os.path.isdir(path):
        raise ValueError(f'--image {path} is a folder; pass one image file in it')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--image {path} does not exist')
    try:  # upright by its EXIF orientation, 16-bit scaled to 8 bits
        image = Image.fromarray(read_image(path).permute(1, 2, 0).numpy())
    except ImageError as err:
        raise ValueError(f'--image {err}') from None
    h, w = size
    scale = max(h / image.height, w / image.width)
    resized = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    return resized.crop((left, top, left + w, top + h))


def to_input(model: nn.Module, image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) tensor normalised as the model's pretrained config says."""
    cfg = resolve_data_config(model=model)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    mean, std = torch.tensor(cfg['mean']).view(1, 3, 1, 1), torch.tensor(cfg['std']).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------
# drawing


def _colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB along an inferno-like ramp."""
    pos = np.clip(values, 0, 1) * (len(_INFERNO) - 1)
    low = np.floor(pos).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (pos - low)[..., None]
    return _INFERNO[low] * (1 - frac) + _INFERNO[low + 1] * frac


def _scale(image_size: Tuple[int, int]) -> int:
    return max(1, PANEL_TARGET // max(image_size))


def figure_size(image_size: Tuple[int, int], zoom: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """(width, height) of the figure `draw_selection` makes for an image of (width, height), with a
    zoom panel of (width, height) when there is one."""
    s = _scale(image_size)
    width, height = 2 * image_size[0] * s + 3 * MARGIN, image_size[1] * s
    if zoom is not None:
        width, height = width + zoom[0] + MARGIN, max(height, zoom[1])
    return width, height + HEADER + MARGIN


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def zoom_region(box: Sequence[int], image_size: Tuple[int, int], patch: int) -> Tuple[int, int, int, int]:
    """A square of whole patches around a pixel box (x0, y0, x1, y1): three times its size, at least 4
    patches, inside the image."""
    x0, y0, x1, y1 = box
    side = max(4 * patch, -(-3 * max(x1 - x0, y1 - y0) // patch) * patch)
    side = min(side, image_size[0] // patch * patch, image_size[1] // patch * patch)
    left = min(max(0, ((x0 + x1) // 2 - side // 2) // patch * patch), image_size[0] // patch * patch - side)
    top = min(max(0, ((y0 + y1) // 2 - side // 2) // patch * patch), image_size[1] // patch * patch - side)
    return left, top, left + side, top + side


def draw_selection(
        image: Image.Image,
        scores: torch.Tensor,
        indices: torch.Tensor,
        grid: Tuple[int, int],
        lines: Sequence[str] = (),
        zoom: Optional[Tuple[int, int, int, int]] = None,
) -> Image.Image:
    """Two panels and a caption: the chosen patches (others dimmed), the selector's map with them outlined;
    with `zoom`, a third panel enlarges that pixel region (whole patches, see `zoom_region`) of the first.

    Args:
        image: the RGB image as the model saw it.
        scores: (N,) selector logits over the rows * cols high-res patches.
        indices: (k,) chosen patch ids.
        grid: (rows, cols) of the high-res grid.
        lines: caption lines (at most two fit).
        zoom: (x0, y0, x1, y1) pixels of the image to enlarge, e.g. around a small object.
    """
    rows, cols = grid
    if scores.numel() != rows * cols:
        raise ValueError(f'{scores.numel()} scores for a {rows}x{cols} grid')
    s = _scale(image.size)
    w, h = image.width * s, image.height * s
    big = np.asarray(image.resize((w, h), Image.NEAREST), dtype=np.float32)  # (h, w, 3)
    ph, pw = h / rows, w / cols

    chosen = torch.zeros(rows * cols, dtype=torch.bool)
    chosen[indices.long()] = True
    # grid -> pixels by nearest neighbour, exact even when the image side is not a multiple of the grid
    ys, xs = np.arange(h) * rows // h, np.arange(w) * cols // w
    to_pixels = lambda values: values.reshape(rows, cols)[ys][:, xs]  # noqa: E731

    seen = to_pixels(chosen.numpy().astype(np.float32))[..., None]  # (h, w, 1)
    left = Image.fromarray((big * (0.25 + 0.75 * seen)).clip(0, 255).astype(np.uint8))
    prob = torch.softmax(scores.float(), 0).numpy()
    heat = _colormap(to_pixels(prob / prob.max()))
    right = Image.fromarray((0.4 * big + 0.6 * heat).clip(0, 255).astype(np.uint8))

    panel, z = None, 1
    if zoom is not None:
        zx0, zy0, zx1, zy1 = zoom
        z = max(1, ZOOM_TARGET // max(zx1 - zx0, zy1 - zy0))
        panel = left.crop((zx0 * s, zy0 * s, zx1 * s, zy1 * s))
        panel = panel.resize((panel.width * z // s, panel.height * z // s), Image.NEAREST)
    fig = Image.new('RGB', figure_size(image.size, panel.size if panel else None), (255, 255, 255))
    fig.paste(left, (MARGIN, HEADER))
    fig.paste(right, (2 * MARGIN + w, HEADER))
    draw = ImageDraw.Draw(fig)
    for index in indices.tolist():
        r, c = divmod(index, cols)
        for x0 in (MARGIN, 2 * MARGIN + w):
            box = [x0 + c * pw, HEADER + r * ph, x0 + (c + 1) * pw - 1, HEADER + (r + 1) * ph - 1]
            draw.rectangle(box, outline=CHOSEN_COLOUR, width=max(1, s))
    font, small = _font(15), _font(12)
    if panel is not None:
        x_panel = 3 * MARGIN + 2 * w
        fig.paste(panel, (x_panel, HEADER))
        ppx, ppy = image.width / cols, image.height / rows  # a patch in image pixels
        for index in indices.tolist():
            r, c = divmod(index, cols)
            x, y = (c * ppx - zx0) * z, (r * ppy - zy0) * z
            if 0 <= x < panel.width and 0 <= y < panel.height:
                draw.rectangle([x_panel + x, HEADER + y, x_panel + x + ppx * z - 1, HEADER + y + ppy * z - 1],
                               outline=CHOSEN_COLOUR, width=2)
        draw.rectangle([MARGIN + zx0 * s - 1, HEADER + zy0 * s - 1, MARGIN + zx1 * s, HEADER + zy1 * s],
                       outline=ZOOM_COLOUR, width=2)
        draw.text((x_panel, HEADER - 16), f'around the sign (the box on the left), {z}x', fill=(90, 90, 90),
                  font=small)
    for i, line in enumerate(list(lines)[:2]):
        draw.text((MARGIN, 6 + 22 * i), line, fill=(0, 0, 0), font=font)
    draw.text((MARGIN, HEADER - 16), 'what the extractor sees', fill=(90, 90, 90), font=small)
    draw.text((2 * MARGIN + w, HEADER - 16), "selector's map, chosen patches outlined", fill=(90, 90, 90), font=small)
    return fig


def draw_segmentation(
        image: Image.Image,
        prediction: np.ndarray,
        truth: Optional[np.ndarray],
        indices: torch.Tensor,
        grid: Tuple[int, int],
        lines: Sequence[str] = (),
) -> Image.Image:
    """Three panels and a caption: the chosen patches (others dimmed, outlined), the predicted mask and the
    true mask (when given) over the image, each class in its colour, and a legend of the classes shown.

    Args:
        image: the RGB image as the model saw it.
        prediction, truth: (H, W) class ids (0 background).
        indices: (k,) chosen patch ids of the rows * cols grid.
        grid: (rows, cols) of the high-res grid.
        lines: caption lines (at most two fit).
    """
    rows, cols = grid
    w, h = image.size
    pixels = np.asarray(image, dtype=np.float32)  # (h, w, 3)
    chosen = torch.zeros(rows * cols, dtype=torch.bool)
    chosen[indices.long()] = True
    ys, xs = np.arange(h) * rows // h, np.arange(w) * cols // w
    seen = chosen.numpy().reshape(rows, cols)[ys][:, xs][..., None].astype(np.float32)  # (h, w, 1)
    panels = [Image.fromarray((pixels * (0.25 + 0.75 * seen)).clip(0, 255).astype(np.uint8))]
    for mask in (prediction, truth):
        if mask is None:
            continue
        sign = (mask > 0)[..., None].astype(np.float32)  # (h, w, 1)
        tinted = 0.5 * pixels * (1 - sign) + CLASS_COLOURS[mask] * sign  # the image faded, signs in colour
        panels.append(Image.fromarray(tinted.clip(0, 255).astype(np.uint8)))
    legend_height = 40
    fig = Image.new('RGB', (len(panels) * (w + MARGIN) + MARGIN, h + HEADER + MARGIN + legend_height), 'white')
    draw = ImageDraw.Draw(fig)
    ph, pw = h / rows, w / cols
    for i, panel in enumerate(panels):
        fig.paste(panel, (MARGIN + i * (w + MARGIN), HEADER))
    for index in indices.tolist():
        r, c = divmod(index, cols)
        draw.rectangle([MARGIN + c * pw, HEADER + r * ph, MARGIN + (c + 1) * pw - 1, HEADER + (r + 1) * ph - 1],
                       outline=CHOSEN_COLOUR, width=1)
    font, small = _font(15), _font(12)
    titles = ['what the extractor sees (chosen patches outlined)', 'predicted mask', 'true mask']
    for i, title in enumerate(titles[:len(panels)]):
        draw.text((MARGIN + i * (w + MARGIN), HEADER - 16), title, fill=(90, 90, 90), font=small)
    for i, line in enumerate(list(lines)[:2]):
        draw.text((MARGIN, 6 + 22 * i), line, fill=(0, 0, 0), font=font)
    shown = set(np.unique(prediction).tolist()) | (set(np.unique(truth).tolist()) if truth is not None else set())
    shown = sorted(shown - {0})
    x, y = MARGIN, HEADER + h + MARGIN + 4
    for c in shown:
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in CLASS_COLOURS[c]))
        draw.text((x + 16, y - 1), SEGMENTATION_CLASSES[c], fill=(0, 0, 0), font=small)
        x += 28 + int(draw.textlength(SEGMENTATION_CLASSES[c], font=small))
        if x > fig.width - 120:
            x, y = MARGIN, y + 18
    return fig


# --------------------------------------------------------------------------------------------
# commands


def _scene_or_image(args: argparse.Namespace, model: LookWhere):
    """The PIL image the model sees, and the generated scene (None for --image)."""
    size = tuple(model.patch_embed.img_size)
    if args.image:
        return load_image(args.image, size), None
    if size[0] != size[1]:
        raise ValueError(f'generated scenes are square; this model takes {size[0]}x{size[1]}: pass --image')
    area_range = SIGN_SCENES.get(model.pretrained_cfg.get('architecture'), AREA_RANGE)  # as the model was trained
    scene = generate_scene(args.seed, 'test', args.index, img_size=size[0], area_range=area_range)
    return scene.image, scene


def _zoom_on(scene, image: Image.Image, model: LookWhere) -> Optional[Tuple[int, int, int, int]]:
    """The region to enlarge around a generated scene's sign, when the figure would draw it small."""
    if scene is None:
        return None
    x0, y0, x1, y1 = scene.box
    if max(x1 - x0, y1 - y0) * _scale(image.size) >= MIN_SIGN_PX:
        return None
    return zoom_region(scene.box, image.size, model.patch_embed.patch_size[0])


def _describe(model: nn.Module, logits: torch.Tensor, names: Optional[Sequence[str]]) -> str:
    if not model.num_classes:  # its forward gives pooled features, e.g. with the authors' weights, which have no head
        return 'no classifier head (num_classes=0, features only): the figure shows where it looks'
    prob = torch.softmax(logits.float(), -1)[0]
    p, i = prob.max(0)
    name = names[i] if names is not None else f'class {int(i)}'
    return f'{name} ({100 * p:.1f}%)'


def _look(model: LookWhere, x: torch.Tensor):
    with torch.no_grad(), SelectionRecorder(model) as rec:
        logits = model(x)
    return logits, rec.records[-1]['map'][0], rec.records[-1]['indices'][0]


def _sign_coverage(scene, indices: torch.Tensor, model: LookWhere) -> str:
    under = patches_under_box(scene.box, model.grid_size, model.patch_embed.patch_size[0])
    return f'{len(under & set(indices.tolist()))} of the {len(under)} patches under the sign'


def _model_and_image(args: argparse.Namespace, command: str):
    """(model, image, generated scene or None) as the command's arguments ask; None once it has said what is
    wrong and the way out."""
    try:
        _check_output(args.output)
        model = _create(args)
        return (model, *_scene_or_image(args, model))
    except (RuntimeError, OSError, ValueError) as err:
        print(f'lookwhere {command}: {err}')
        offline = isinstance(err, RuntimeError)  # weights neither reachable nor cached (or timm's own Hub error)
        if offline and args.model.split('.')[0] not in SIGN_SCENES and not args.checkpoint:
            print('Without network, use the offline model (`lookwhere demo`) or pass the weights file: '
                  f'`lookwhere {command} --model {args.model} --checkpoint FILE --image {args.image or "PHOTO"}`')
        return None


def run_dense_demo(args: argparse.Namespace) -> int:
    """The shipped segmenter on a generated dense scene: its mask beside the truth, the chosen patches."""
    from .segmentation import confusion_matrix, create_segmenter, mean_iou
    try:
        _check_output(args.output)
    except ValueError as err:
        print(f'lookwhere demo: {err}')
        return 1
    torch.set_num_threads(args.threads)
    model = create_segmenter(DENSE_MODEL, pretrained=True, **dict(args.model_kwargs or {})).eval()
    if args.k is not None or args.k_ratio is not None:
        model.set_k(k=args.k, k_ratio=args.k_ratio)
    size = model.backbone.patch_embed.img_size[0]
    scene = generate_dense_scene(args.seed, 'test', args.index, img_size=size)
    x = to_input(model, scene.image)
    with torch.no_grad(), SelectionRecorder(model.backbone) as rec:
        prediction = model(x).argmax(1)[0]  # (H, W)
    indices = rec.records[-1]['indices'][0]
    truth = torch.from_numpy(scene.mask)
    sign_classes = list(range(1, len(SEGMENTATION_CLASSES)))
    miou = mean_iou(confusion_matrix(prediction, truth, len(SEGMENTATION_CLASSES)), sign_classes)
    times = median_latency_ms(dict(segmenter=model), x, args.runs)
    backbone = model.backbone
    names = ', '.join(SEGMENTATION_CLASSES[label + 1] for label in scene.labels)
    patch = backbone.patch_embed.patch_size[0]
    rows, cols = backbone.grid_size
    holding = torch.from_numpy(scene.mask).view(rows, patch, cols, patch).amax(dim=(1, 3)).flatten() > 0  # (N,)
    under = set(torch.nonzero(holding).flatten().tolist())
    looked = (f'{model.k} of {backbone.num_patches} patches ({100 * model.k / backbone.num_patches:.0f}%), '
              f'{len(under & set(indices.tolist()))} of the {len(under)} patches holding a sign')
    print(f'model       {DENSE_MODEL} ({model.pretrained_cfg.get("architecture", "")} backbone, shipped segmenter)')
    print(f'image       generated dense test scene {args.index} (seed {args.seed}): {len(scene.labels)} signs '
          f'({names})')
    print(f'mIoU        {100 * miou:.1f} (the sign classes of this scene)')
    print(f'looked at   {looked}')
    print(f"time        {times['segmenter']:.1f} ms (median of {args.runs}, batch 1, "
          f'{torch.get_num_threads()} threads)')
    lines = [f'{DENSE_MODEL}: {len(scene.labels)} signs, mIoU {100 * miou:.1f} on this scene',
             f"looked at {looked}; {times['segmenter']:.1f} ms"]
    _save(draw_segmentation(scene.image, prediction.numpy(), scene.mask, indices, backbone.grid_size, lines),
          args.output)
    print(f'wrote       {args.output}')
    return 0


def run_demo(args: argparse.Namespace) -> int:
    if args.dense:
        return run_dense_demo(args)
    loaded = _model_and_image(args, 'demo')
    if loaded is None:
        return 1
    model, image, scene = loaded
    torch.set_num_threads(args.threads)
    x = to_input(model, image)
    logits, scores, indices = _look(model, x)
    names = class_names(model)

    shipped = _is_signs_model(model) and args.pretrained and not args.checkpoint
    if shipped:  # the teacher it was distilled from ships beside it
        teacher = create_teacher(f"{model.pretrained_cfg['architecture']}.{SIGNS_TAG}")
        teacher_kind = 'the full-res teacher'
    else:  # the same blocks on every patch: weights do not change the time
        teacher = create_dense_counterpart(model)
        teacher_kind = 'a full-res ViT of the same size (random weights: time only)'
    teacher.eval()
    times = median_latency_ms(dict(lookwhere=model, teacher=teacher), x, args.runs)

    if args.checkpoint:
        source = args.checkpoint
    elif args.pretrained:
        source = model.pretrained_cfg.get('file') or model.pretrained_cfg.get('hf_hub_id')
    else:
        source = 'random weights'
    print(f'model       {args.model} ({source})')
    if scene is not None:
        print(f"image       generated test scene {args.index} (seed {args.seed}): a '{scene.class_name}' sign "
              f"covering {100 * scene.area_fraction:.1f}% of the image")
    else:
        print(f'image       {args.image}, resized and centre-cropped to {image.width}x{image.height}')
    print(f'prediction  {_describe(model, logits, names)}')
    looked = f'{model.k} of {model.num_patches} patches ({100 * model.k / model.num_patches:.0f}%)'
    if scene is not None:
        looked += f', {_sign_coverage(scene, indices, model)}'
    print(f'looked at   {looked}')
    speedup = times['teacher'] / times['lookwhere']
    print(f"time        {times['lookwhere']:.1f} ms vs {times['teacher']:.1f} ms for {teacher_kind} on all "
          f"{model.num_patches} patches: {speedup:.1f}x faster (median of {args.runs}, batch 1, "
          f'{torch.get_num_threads()} threads)')
    if shipped:
        with torch.no_grad():
            print(f'teacher     {_describe(teacher, teacher(x), names)}')
    truth = f"   (the sign is '{scene.class_name}')" if scene is not None else ''
    lines = [f'{args.model}: {_describe(model, logits, names)}{truth}',
             f"looked at {looked}; {times['lookwhere']:.1f} ms vs {times['teacher']:.1f} ms full-res"]
    _save(draw_selection(image, scores, indices, model.grid_size, lines, _zoom_on(scene, image, model)), args.output)
    print(f'wrote       {args.output}')
    return 0


def run_show(args: argparse.Namespace) -> int:
    loaded = _model_and_image(args, 'show')
    if loaded is None:
        return 1
    model, image, scene = loaded
    x = to_input(model, image)
    logits, scores, indices = _look(model, x)
    description = _describe(model, logits, class_names(model))
    lines = [f'{args.model}: {description}', f'looked at {model.k} of {model.num_patches} patches']
    _save(draw_selection(image, scores, indices, model.grid_size, lines, _zoom_on(scene, image, model)), args.output)
    print(f'{description}; looked at {model.k} of {model.num_patches} patches; wrote {args.output}')
    return 0


def _check_output(path: str) -> None:
    """Refuse a figure path that cannot be written, before any work is done."""
    if os.path.isdir(path):
        raise ValueError(f'--output {path} is a folder; give a file name, e.g. {os.path.join(path, "lookwhere.png")}')
    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions():
        raise ValueError(f'--output {path}: Pillow cannot tell an image format from {extension or "no extension"}; '
                         f'end it in .png or .jpg')


def _save(figure: Image.Image, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    figure.save(path)


def _add_model_arguments(parser: argparse.ArgumentParser, default_model: Optional[str]) -> None:
    parser.add_argument('--model', default=default_model, required=default_model is None,
                        help='LookWhere model, timm name with optional .tag (default: %(default)s)')
    parser.add_argument('--checkpoint', default=None, metavar='FILE',
                        help="weights file (.safetensors, .pth, the authors' .pt) instead of the registered ones")
    parser.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                        help='load the registered weights (shipped, or from the Hugging Face Hub) (default: yes)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help='extra timm.create_model arguments, e.g. img_size=448')
    parser.add_argument('--k', type=positive_int, default=None, help='patches the extractor sees')
    parser.add_argument('--k-ratio', type=float, default=None,
                        help="or that number as a fraction (default: 0.05 for the shipped sign models, "
                             "else the model's)")
    parser.add_argument('--image', default=None, metavar='PATH', help='an image file (default: a generated scene)')
    parser.add_argument('--seed', type=non_negative_int, default=0, help='seed of the generated scene (default: 0)')
    parser.add_argument('--index', type=non_negative_int, default=0,
                        help='index of the generated test scene (default: 0)')


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        'demo', help='run the shipped sign model on a scene: prediction, patches seen, time vs the full-res teacher',
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(demo, f'{SIGNS_MODEL}.{SIGNS_TAG}')
    demo.add_argument('--output', default='lookwhere_demo.png', help='figure to write (default: %(default)s)')
    demo.add_argument('--runs', type=positive_int, default=20,
                      help='timed forwards of each model (default: %(default)s)')
    demo.add_argument('--threads', type=positive_int, default=torch.get_num_threads(),
                      help='torch threads (default: %(default)s)')
    demo.add_argument('--dense', action='store_true',
                      help=f'a dense scene (1-6 signs) and the shipped segmenter {DENSE_MODEL}: its mask beside the '
                           'truth (--model and --image do not apply)')
    demo.set_defaults(func=run_demo)

    show = subparsers.add_parser(
        'show', help="draw a LookWhere model's selector map and chosen patches over an image",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(show, None)
    show.add_argument('--output', default='lookwhere_show.png', help='figure to write (default: %(default)s)')
    show.set_defaults(func=run_show)

"""Generated traffic-sign scenes: procedural high-res street images with a small sign, as datasets, tensors, folders.

The closest offline stand-in for the paper's high-res Traffic Signs task. Each scene is a cluttered
picture (textured background, lines and poles, coloured shapes that are not signs, some of them
sign-like) with exactly one traffic-sign-like object, whose silhouette covers 1-2% of the image
(`AREA_RANGE`), or 0.25-0.5% in the wide scenes (`WIDE_AREA_RANGE`: the same sign in pixels in a 512 px
image, a 4x larger field of view).
The class is set by the sign's shape, colours and inner symbol; several classes differ only by the
symbol (arrow directions, '!' vs '+', ...), which a low-res copy of the image blurs away.

A scene is a pure function of (seed, split, index): the splits draw from disjoint seed sequences,
so train, val and test never share a scene.

    ds = SparseSigns('test', num_samples=1000)        # on the fly, a torch Dataset of (PIL, label)
    wide = SparseSigns('test', 1000, img_size=512, area_range=WIDE_AREA_RANGE)   # the high-res regime
    scene = ds.scene(0)                               # .image, .label, .box, .area_fraction
    tensors = SceneTensors(ds)                        # (uint8 (3, H, W), label, box): batches with the sign's box
    write_image_folder('data', 'train', 8000)         # data/train/<class>/<index>.png for timm tools

Dense scenes (`generate_dense_scene`, `DenseSigns`) hold 1 to 6 signs of mixed classes, each sized as in
the wide scenes, among the same clutter, with a per-pixel mask (0 background, 1 + the class of each sign):

    dense = generate_dense_scene(0, 'train', 3)      # .image, .mask (H, W) uint8, .labels, .boxes
    write_segmentation_folder('seg', 'train', 2000)  # seg/images/train/N.png, seg/annotations/train/N.png
"""
import math
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from .files import replacing

__all__ = [
    'SIGN_CLASSES', 'CLASS_NAMES', 'SPLITS', 'AREA_RANGE', 'WIDE_AREA_RANGE', 'SignClass', 'Scene', 'generate_scene',
    'render_sign',
    'scene_rng', 'scene_label', 'SparseSigns', 'SceneTensors', 'folder_names', 'write_image_folder',
    'patches_under_box', 'sign_patches_seen', 'SEGMENTATION_CLASSES', 'NUM_SIGNS_RANGE', 'DenseScene',
    'dense_scene_rng', 'generate_dense_scene', 'DenseSigns', 'DenseSceneTensors', 'write_segmentation_folder',
]

SPLITS = ('train', 'val', 'test')
AREA_RANGE = (0.01, 0.02)  # fraction of the image the sign's silhouette covers
# 256 px scenes' signs in pixels, in 512 px scenes: a 4x larger field of view (the paper's high-res regime)
WIDE_AREA_RANGE = (AREA_RANGE[0] / 4, AREA_RANGE[1] / 4)
MIN_IMG_SIZE = 64
_SUPERSAMPLE = 3  # signs are drawn this much larger, then downsampled: smooth edges and symbols

Colour = Tuple[int, int, int]
RED, BLUE, YELLOW, WHITE, BLACK = (200, 25, 30), (20, 75, 170), (245, 195, 20), (245, 245, 240), (20, 20, 20)


@dataclass(frozen=True)
class SignClass:
    name: str
    shape: str  # circle, triangle, triangle_down, octagon, diamond, square
    fill: Colour
    border: Optional[Colour]  # a ring around the fill, or None
    symbol: str  # none, bar, digits, slash, exclaim, plus, arrow_up/left/right, ring, letter_p
    symbol_colour: Colour


SIGN_CLASSES: Tuple[SignClass, ...] = (
    SignClass('stop', 'octagon', RED, WHITE, 'bar', WHITE),
    SignClass('no_entry', 'circle', RED, None, 'bar', WHITE),
    SignClass('speed_limit', 'circle', WHITE, RED, 'digits', BLACK),
    SignClass('no_vehicles', 'circle', WHITE, RED, 'none', BLACK),
    SignClass('no_parking', 'circle', BLUE, RED, 'slash', RED),
    SignClass('warning', 'triangle', WHITE, RED, 'exclaim', BLACK),
    SignClass('crossroads', 'triangle', WHITE, RED, 'plus', BLACK),
    SignClass('yield', 'triangle_down', WHITE, RED, 'none', BLACK),
    SignClass('ahead_only', 'circle', BLUE, None, 'arrow_up', WHITE),
    SignClass('turn_left', 'circle', BLUE, None, 'arrow_left', WHITE),
    SignClass('turn_right', 'circle', BLUE, None, 'arrow_right', WHITE),
    SignClass('roundabout', 'circle', BLUE, None, 'ring', WHITE),
    SignClass('priority_road', 'diamond', YELLOW, WHITE, 'none', BLACK),
    SignClass('parking', 'square', BLUE, WHITE, 'letter_p', WHITE),
)
CLASS_NAMES: Tuple[str, ...] = tuple(c.name for c in SIGN_CLASSES)

# silhouette area / bounding-square area of each shape, to size a sign by the area it covers
_SHAPE_FILL = {
    'circle': math.pi / 4, 'square': 1.0, 'diamond': 0.5, 'octagon': math.sqrt(2) / 2,  # 2 sqrt(2) r^2 / (2r)^2
    'triangle': math.sqrt(3) / 4, 'triangle_down': math.sqrt(3) / 4,
}


@dataclass
class Scene:
    image: Image.Image  # RGB, img_size x img_size
    label: int
    box: Tuple[int, int, int, int]  # the sign's x0, y0, x1, y1 in pixels (x1, y1 exclusive)
    area_fraction: float  # pixels of the sign's silhouette / pixels of the image

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one scene; the split is part of the seed, so splits never overlap."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if index < 0 or seed < 0:
        raise ValueError(f'seed and index must be >= 0, got seed={seed}, index={index}')
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def scene_label(seed: int, split: str, index: int) -> int:
    """The class of a scene without drawing it: the first number of its stream."""
    return int(scene_rng(seed, split, index).integers(len(SIGN_CLASSES)))


# --------------------------------------------------------------------------------------------
# signs


def _polygon(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    """Vertices of a shape inscribed in the circle of radius r around (cx, cy)."""
    if shape == 'square':
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == 'diamond':
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == 'octagon':
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.arange(8) * math.pi / 4 + math.pi / 8]
    if shape in ('triangle', 'triangle_down'):
        # an equilateral triangle as wide as the square, its base on the square's edge
        h = r * math.sqrt(3)
        top, base = (cy - h / 2, cy + h / 2) if shape == 'triangle' else (cy + h / 2, cy - h / 2)
        return [(cx, top), (cx + r, base), (cx - r, base)]
    raise ValueError(f'unknown shape {shape!r}')


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=colour)


def _draw_symbol(draw: ImageDraw.ImageDraw, symbol: str, cx: float, cy: float, r: float, colour) -> None:
    """An inner symbol within radius r of (cx, cy); r is the free radius inside the border."""
    w = max(1.0, 0.22 * r)  # stroke width
    if symbol == 'none':
        return
    if symbol == 'bar':
        draw.rectangle([cx - 0.75 * r, cy - 0.2 * r, cx + 0.75 * r, cy + 0.2 * r], fill=colour)
    elif symbol == 'digits':  # two zeros, like '00'
        for dx in (-0.38 * r, 0.38 * r):
            draw.ellipse([cx + dx - 0.3 * r, cy - 0.5 * r, cx + dx + 0.3 * r, cy + 0.5 * r], outline=colour,
                         width=int(w * 0.8))
    elif symbol == 'slash':
        d = 0.8 * r / math.sqrt(2)
        draw.line([(cx - d, cy - d), (cx + d, cy + d)], fill=colour, width=int(w * 1.2))
    elif symbol == 'exclaim':
        draw.rectangle([cx - 0.5 * w, cy - 0.55 * r, cx + 0.5 * w, cy + 0.2 * r], fill=colour)
        draw.ellipse([cx - 0.6 * w, cy + 0.35 * r, cx + 0.6 * w, cy + 0.35 * r + 1.2 * w], fill=colour)
    elif symbol == 'plus':
        draw.rectangle([cx - 0.5 * w, cy - 0.55 * r, cx + 0.5 * w, cy + 0.55 * r], fill=colour)
        draw.rectangle([cx - 0.55 * r, cy - 0.5 * w, cx + 0.55 * r, cy + 0.5 * w], fill=colour)
    elif symbol.startswith('arrow_'):
        angle = {'arrow_up': -90, 'arrow_left': 180, 'arrow_right': 0}[symbol]
        _draw_arrow(draw, cx, cy, 0.7 * r, w, math.radians(angle), colour)
    elif symbol == 'ring':
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], outline=colour, width=int(w))
        draw.polygon([(cx + 0.55 * r - w, cy - 0.1 * r), (cx + 0.55 * r + w, cy - 0.1 * r),
                      (cx + 0.55 * r, cy + 0.25 * r)], fill=colour)
    elif symbol == 'letter_p':
        draw.rectangle([cx - 0.4 * r, cy - 0.6 * r, cx - 0.4 * r + w, cy + 0.6 * r], fill=colour)
        draw.ellipse([cx - 0.55 * r, cy - 0.6 * r, cx + 0.45 * r, cy + 0.1 * r], outline=colour, width=int(w))
    else:
        raise ValueError(f'unknown symbol {symbol!r}')


def _draw_arrow(draw, cx, cy, length, width, angle, colour) -> None:
    """A shaft and a head pointing along `angle` (radians, image coordinates)."""
    ux, uy = math.cos(angle), math.sin(angle)
    px, py = -uy, ux  # perpendicular
    tail = (cx - ux * length, cy - uy * length)
    neck = (cx + ux * 0.2 * length, cy + uy * 0.2 * length)
    tip = (cx + ux * length, cy + uy * length)
    draw.line([tail, neck], fill=colour, width=int(width))
    head = 0.55 * length
    draw.polygon([tip, (neck[0] + px * head, neck[1] + py * head), (neck[0] - px * head, neck[1] - py * head)],
                 fill=colour)


def _jitter(colour: Colour, rng: np.random.Generator, amount: float = 18) -> Tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in colour)


def render_sign(sign: SignClass, size: float, rng: np.random.Generator) -> Image.Image:
    """An RGBA sign whose bounding square (before rotation) is `size` px, slightly rotated, colours jittered.

    The shape is drawn at its exact (fractional) size, supersampled, and rotated on a canvas that
    grows to hold it, so its silhouette covers fill-ratio * size^2 pixels.
    """
    side = math.ceil(size) + 2  # canvas, px
    big = side * _SUPERSAMPLE
    im = Image.new('RGBA', (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    c, r = big / 2, size * _SUPERSAMPLE / 2
    inner = r
    if sign.border is not None:
        _draw_shape(draw, sign.shape, c, c, r, _jitter(sign.border, rng) + (255,))
        inner = r * 0.78
    _draw_shape(draw, sign.shape, c, c, inner, _jitter(sign.fill, rng) + (255,))
    # the symbol sits in the shape's largest inner circle (a triangle's is lower and smaller)
    sym_r, sym_cy = inner * 0.8, c
    if sign.shape in ('triangle', 'triangle_down'):
        sym_r = inner * 0.55
        sym_cy = c + (0.18 if sign.shape == 'triangle' else -0.18) * inner
    elif sign.shape == 'diamond':
        sym_r = inner * 0.6
    _draw_symbol(draw, sign.symbol, c, sym_cy, sym_r, _jitter(sign.symbol_colour, rng, 10) + (255,))
    im = im.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR, expand=True)
    out = math.ceil(im.width / _SUPERSAMPLE)
    padded = Image.new('RGBA', (out * _SUPERSAMPLE,) * 2, (0, 0, 0, 0))  # a whole number of output pixels
    offset = (out * _SUPERSAMPLE - im.width) // 2
    padded.paste(im, (offset, offset))
    return padded.resize((out, out), Image.LANCZOS)


def _sign_size(sign: SignClass, img_size: int, area_fraction: float) -> float:
    """Side of the bounding square whose silhouette covers `area_fraction` of the image."""
    return img_size * math.sqrt(area_fraction / _SHAPE_FILL[sign.shape])


# --------------------------------------------------------------------------------------------
# clutter


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float: a two-colour gradient, low-frequency blotches and fine texture."""
    top, bottom = rng.uniform(40, 220, 3).astype(np.float32), rng.uniform(30, 200, 3).astype(np.float32)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    img = top * (1 - t) + bottom * t  # (size, 1, 3)
    img = np.broadcast_to(img, (size, size, 3)).copy()
    for cells, amount in ((4, 45), (16, 25), (64, 12)):
        channels = 3 if rng.random() < 0.5 else 1  # coloured or grey blotches
        noise = rng.normal(0, amount, (channels, cells, cells)).astype(np.float32)
        noise = np.stack([np.asarray(Image.fromarray(n).resize((size, size), Image.BICUBIC)) for n in noise], -1)
        img += noise  # (size, size, 3) + (size, size, 1 or 3)
    return img


def _muted_colour(rng: np.random.Generator) -> Tuple[int, int, int]:
    """A greyish colour: never a sign's saturated red, blue or yellow."""
    return tuple(int(v) for v in np.clip(rng.uniform(40, 200) + rng.normal(0, 25, 3), 0, 255))


def _random_colour(rng: np.random.Generator) -> Tuple[int, int, int]:
    """Mostly muted colours, sometimes a sign colour: colour alone must not give a sign away."""
    if rng.random() < 0.3:
        return _jitter((RED, BLUE, YELLOW, WHITE)[rng.integers(4)], rng, 25)
    return tuple(int(v) for v in rng.integers(20, 236, 3))


def _draw_clutter(im: Image.Image, rng: np.random.Generator, sign_size: float) -> None:
    draw = ImageDraw.Draw(im)
    size = im.size[0]
    for _ in range(rng.integers(2, 6)):  # blocks: buildings, foliage, hoardings
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.1, 0.5, 2) * size
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=_random_colour(rng))
        if rng.random() < 0.5:  # stripes on it
            colour, step = _random_colour(rng), rng.uniform(3, 12)
            for y in np.arange(y0, y0 + h, 2 * step):
                draw.rectangle([x0, y, x0 + w, y + step], fill=colour)
    for _ in range(rng.integers(4, 12)):  # road markings, wires, branches
        p = rng.uniform(-0.1, 1.1, 4) * size
        draw.line([tuple(p[:2]), tuple(p[2:])], fill=_random_colour(rng), width=int(rng.integers(1, 6)))
    for _ in range(rng.integers(1, 4)):  # poles
        x, y = rng.uniform(0, size), rng.uniform(0, 0.7 * size)
        draw.rectangle([x, y, x + rng.uniform(2, 5), size], fill=_jitter((120, 120, 120), rng, 30))
    for _ in range(rng.integers(6, 14)):  # shapes that are not signs, at sign scale
        r = sign_size * rng.uniform(0.25, 0.75)
        cx, cy = rng.uniform(0, size, 2)
        shape = ('circle', 'square', 'diamond', 'octagon', 'triangle', 'triangle_down')[rng.integers(6)]
        kind = rng.random()
        if kind < 0.35:  # a ring around a fill: sign-like, but a greyish ring and no symbol
            _draw_shape(draw, shape, cx, cy, r, _muted_colour(rng))
            _draw_shape(draw, shape, cx, cy, r * 0.75, _random_colour(rng))
        elif kind < 0.8:
            _draw_shape(draw, shape, cx, cy, r, _random_colour(rng))
        else:  # an ellipse or a free polygon
            pts = [(cx + r * rng.uniform(0.5, 1.3) * math.cos(a), cy + r * rng.uniform(0.5, 1.3) * math.sin(a))
                   for a in np.sort(rng.uniform(0, 2 * math.pi, rng.integers(3, 7)))]
            draw.polygon(pts, fill=_random_colour(rng))


def _lighting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Global gain and colour cast, a shading ramp in a random direction, sensor noise (float32 throughout)."""
    size = img.shape[0]
    gain = (rng.uniform(0.6, 1.25) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)  # (3,)
    angle, strength = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.5)
    coord = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    ramp = 1 + strength * (coord[None, :] * math.cos(angle) + coord[:, None] * math.sin(angle))  # (size, size)
    img = img * gain * ramp[..., None] + np.float32(rng.uniform(-20, 20))
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(1, 6))
    return np.clip(img, 0, 255)


# --------------------------------------------------------------------------------------------
# scenes


def generate_scene(
        seed: int = 0,
        split: str = 'train',
        index: int = 0,
        img_size: int = 256,
        label: Optional[int] = None,
        area_range: Tuple[float, float] = AREA_RANGE,
) -> Scene:
    """One scene, a pure function of its arguments.

    Args:
        seed: base seed of the data set.
        split: 'train', 'val' or 'test' (disjoint seed sequences).
        index: scene number within the split.
        img_size: side of the square image in pixels.
        label: force the sign's class (default: drawn uniformly from the scene's seed).
        area_range: (low, high) fraction of the image the sign's silhouette covers, drawn uniformly.
    """
    if not isinstance(img_size, int) or img_size < MIN_IMG_SIZE:
        raise ValueError(f'img_size must be an int >= {MIN_IMG_SIZE}, got {img_size!r}')
    _check_area_range(area_range)
    if label is not None and not 0 <= label < len(SIGN_CLASSES):
        raise ValueError(f'label must be in [0, {len(SIGN_CLASSES)}), got {label}')
    rng = scene_rng(seed, split, index)
    drawn_label = int(rng.integers(len(SIGN_CLASSES)))  # as scene_label; drawn even when forced, so the rest stays
    label = drawn_label if label is None else label
    sign_class = SIGN_CLASSES[label]
    area = rng.uniform(*area_range)
    sign_size = _sign_size(sign_class, img_size, area)

    background = _background(rng, img_size)
    im = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    _draw_clutter(im, rng, sign_size)
    if rng.random() < 0.3:  # a little defocus on the clutter only
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))

    sign = render_sign(sign_class, sign_size, rng)  # (side, side) RGBA, the sign and a transparent margin
    side = sign.width
    x0 = int(rng.integers(0, img_size - side + 1))
    y0 = int(rng.integers(0, img_size - side + 1))
    if rng.random() < 0.6:  # on a pole
        draw = ImageDraw.Draw(im)
        pole_x = x0 + side / 2
        draw.rectangle([pole_x - 1.5, y0 + side / 2, pole_x + 1.5, img_size], fill=_jitter((130, 130, 130), rng))
    sign_light = rng.uniform(0.75, 1.15)
    rgb = np.asarray(sign.convert('RGB'), dtype=np.float32) * sign_light
    sign = Image.merge('RGBA', (*Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).split(), sign.getchannel('A')))
    im.paste(sign, (x0, y0), sign)

    img = _lighting(np.asarray(im, dtype=np.float32), rng)
    alpha = np.asarray(sign.getchannel('A'), dtype=np.float32) / 255  # (side, side)
    ys, xs = np.nonzero(alpha > 0.5)
    return Scene(
        image=Image.fromarray(img.astype(np.uint8)),
        label=label,
        box=(x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1),
        area_fraction=float(alpha.sum() / img_size ** 2),
    )


def _check_area_range(area_range: Tuple[float, float]) -> None:
    low, high = area_range
    if not 0 < low <= high <= 0.25:
        raise ValueError(f'area_range must be (low, high) with 0 < low <= high <= 0.25, got {area_range}')


class SparseSigns(Dataset):
    """`num_samples` scenes of one split, generated on the fly: (image, label) pairs.

    `transform` (set by the constructor or by timm's `create_loader`) maps the PIL image; without
    one the item is the PIL image itself.
    """

    def __init__(
            self,
            split: str = 'train',
            num_samples: int = 1000,
            img_size: int = 256,
            seed: int = 0,
            transform: Optional[Callable] = None,
            area_range: Tuple[float, float] = AREA_RANGE,
    ):
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f'num_samples must be a positive int, got {num_samples!r}')
        if not isinstance(img_size, int) or img_size < MIN_IMG_SIZE:
            raise ValueError(f'img_size must be an int >= {MIN_IMG_SIZE}, got {img_size!r}')
        _check_area_range(area_range)
        self.split = split
        self.num_samples = num_samples
        self.area_range = tuple(area_range)
        self.img_size = img_size
        self.seed = seed
        self.transform = transform
        self.classes = list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.num_samples:
            raise IndexError(f'index {index} out of range for {self.num_samples} scenes')
        return generate_scene(self.seed, self.split, index, self.img_size, area_range=self.area_range)

    def __getitem__(self, index: int):
        scene = self.scene(index)
        image = self.transform(scene.image) if self.transform is not None else scene.image
        return image, scene.label

    def extra_repr(self) -> str:
        return (f'split={self.split}, num_samples={self.num_samples}, img_size={self.img_size}, seed={self.seed}, '
                f'area_range={self.area_range}')

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.extra_repr()})'


class SceneTensors(Dataset):
    """`signs`' scenes as (uint8 (3, H, W) image, label, (4,) sign box) tensors: batches that say where the sign is."""

    def __init__(self, signs: SparseSigns):
        self.signs = signs

    def __len__(self) -> int:
        return len(self.signs)

    def __getitem__(self, index: int):
        scene = self.signs.scene(index)
        return pil_to_tensor(scene.image), scene.label, torch.tensor(scene.box)


def folder_names() -> Tuple[str, ...]:
    """Class folder names: '00_stop', '01_no_entry', ... sort in label order, so the indices an
    ImageFolder (timm, torchvision) gives them are the labels."""
    return tuple(f'{i:02d}_{name}' for i, name in enumerate(CLASS_NAMES))


def write_image_folder(
        root: str,
        split: str,
        num_samples: int,
        img_size: int = 256,
        seed: int = 0,
        progress: bool = True,
        area_range: Tuple[float, float] = AREA_RANGE,
) -> str:
    """Write `root/split/<label>_<class name>/<index>.png` and `root/class_map.txt`: an ImageFolder that
    `timm.data.create_dataset('', root=root, split=split, class_map=root + '/class_map.txt')` reads with
    the scenes' labels (see `folder_names`).

    Existing files are kept, so an interrupted export resumes. Returns the split's folder.
    """
    dataset = SparseSigns(split, num_samples, img_size, seed, area_range=area_range)
    folder = os.path.join(root, split)
    for name in folder_names():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    # timm numbers only the folders that hold images; its class_map= keeps the labels when some are empty
    with open(os.path.join(root, 'class_map.txt'), 'w') as f:
        f.write('\n'.join(folder_names()) + '\n')
    indices: Sequence[int] = range(num_samples)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc=f'writing {split}', unit='img', mininterval=5)
    for index in indices:
        label = scene_label(seed, split, index)  # known without drawing the scene
        path = os.path.join(folder, folder_names()[label], f'{index:06d}.png')
        if not os.path.exists(path):
            # written aside first: an interrupted save leaves no truncated .png for ImageFolder to find
            with replacing(path) as tmp:
                dataset.scene(index).image.save(tmp, format='PNG', compress_level=1)
    return folder


# --------------------------------------------------------------------------------------------
# signs on a patch grid


def patches_under_box(box: Sequence[int], grid_size: Tuple[int, int], patch: int) -> Set[int]:
    """Flat ids of the grid patches a pixel box (x0, y0, x1, y1), x1 and y1 exclusive, overlaps."""
    (rows, cols), (x0, y0, x1, y1) = grid_size, box
    return {r * cols + c for r in range(y0 // patch, min(rows, (y1 - 1) // patch + 1))
            for c in range(x0 // patch, min(cols, (x1 - 1) // patch + 1))}


def sign_patches_seen(
        indices: torch.Tensor, boxes: torch.Tensor, grid_size: Tuple[int, int], patch: int) -> torch.Tensor:
    """Fraction of the patches under each sign's box that a selection chose: (B, k) ids, (B, 4) boxes -> (B,)."""
    seen = []
    for chosen, box in zip(indices.tolist(), boxes.tolist()):
        under = patches_under_box(box, grid_size, patch)
        seen.append(len(under & set(chosen)) / len(under))
    return torch.tensor(seen)


# --------------------------------------------------------------------------------------------
# dense scenes: several signs and a per-pixel mask


SEGMENTATION_CLASSES: Tuple[str, ...] = ('background',) + CLASS_NAMES  # mask value i names SEGMENTATION_CLASSES[i]
NUM_SIGNS_RANGE = (1, 6)  # signs per dense scene, drawn uniformly (both ends included)
_DENSE_STREAM = 1  # appended to a dense scene's seed: its stream never repeats a sparse scene's
_PLACEMENT_TRIES = 50  # random positions tried for a sign before it is left out (crowded scenes only)


@dataclass
class DenseScene:
    image: Image.Image  # RGB, img_size x img_size
    mask: np.ndarray  # (img_size, img_size) uint8: 0 background, 1 + label under each sign's silhouette
    labels: Tuple[int, ...]  # each sign's class, in drawing order
    boxes: Tuple[Tuple[int, int, int, int], ...]  # each sign's x0, y0, x1, y1 in pixels (x1, y1 exclusive)


def dense_scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one dense scene: disjoint splits as `scene_rng`, and a stream of its own."""
    scene_rng(seed, split, index)  # checks the arguments
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index, _DENSE_STREAM]))


def _overlaps(box: Tuple[int, int, int, int], others: Sequence[Tuple[int, int, int, int]], gap: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < ox1 + gap and ox0 < x1 + gap and y0 < oy1 + gap and oy0 < y1 + gap
               for ox0, oy0, ox1, oy1 in others)


def generate_dense_scene(
        seed: int = 0,
        split: str = 'train',
        index: int = 0,
        img_size: int = 512,
        num_signs: Tuple[int, int] = NUM_SIGNS_RANGE,
        area_range: Tuple[float, float] = WIDE_AREA_RANGE,
) -> DenseScene:
    """One dense scene, a pure function of its arguments: 1 to 6 signs (classes drawn independently) that
    do not touch, the clutter of the sparse scenes (sign-like shapes included) and the mask of every sign.

    Args:
        seed, split, index: as `generate_scene` (a dense scene has its own stream, see `dense_scene_rng`).
        img_size: side of the square image in pixels.
        num_signs: (low, high) signs per scene, drawn uniformly, both included.
        area_range: (low, high) fraction of the image each sign's silhouette covers (default: the wide scenes').
    """
    if not isinstance(img_size, int) or img_size < MIN_IMG_SIZE:
        raise ValueError(f'img_size must be an int >= {MIN_IMG_SIZE}, got {img_size!r}')
    _check_area_range(area_range)
    low, high = num_signs
    if not 1 <= low <= high:
        raise ValueError(f'num_signs must be (low, high) with 1 <= low <= high, got {num_signs}')
    rng = dense_scene_rng(seed, split, index)
    count = int(rng.integers(low, high + 1))
    classes = rng.integers(len(SIGN_CLASSES), size=count)
    sizes = [_sign_size(SIGN_CLASSES[c], img_size, rng.uniform(*area_range)) for c in classes]

    background = _background(rng, img_size)
    im = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    _draw_clutter(im, rng, float(np.mean(sizes)))  # distractors at the signs' scale
    if rng.random() < 0.3:  # a little defocus on the clutter only
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))

    placed = []  # (label, RGBA sign, x0, y0, brightness)
    taken: List[Tuple[int, int, int, int]] = []
    for label, size in zip(classes.tolist(), sizes):
        sign = render_sign(SIGN_CLASSES[label], size, rng)  # (side, side) RGBA
        side = sign.width
        for _ in range(_PLACEMENT_TRIES):  # signs do not touch: every pixel of the mask has one owner
            x0, y0 = (int(v) for v in rng.integers(0, max(1, img_size - side + 1), 2))
            if not _overlaps((x0, y0, x0 + side, y0 + side), taken, gap=2):
                break
        else:
            continue
        taken.append((x0, y0, x0 + side, y0 + side))
        placed.append((label, sign, x0, y0, rng.uniform(0.75, 1.15)))
    draw = ImageDraw.Draw(im)
    for _, sign, x0, y0, _ in placed:  # poles first: one must not cross a sign drawn before it
        if rng.random() < 0.6:
            pole_x = x0 + sign.width / 2
            draw.rectangle([pole_x - 1.5, y0 + sign.width / 2, pole_x + 1.5, img_size],
                           fill=_jitter((130, 130, 130), rng))

    mask = np.zeros((img_size, img_size), dtype=np.uint8)
    labels, boxes = [], []
    for label, sign, x0, y0, brightness in placed:
        rgb = np.asarray(sign.convert('RGB'), dtype=np.float32) * brightness
        alpha = sign.getchannel('A')
        im.paste(Image.fromarray(rgb.clip(0, 255).astype(np.uint8)), (x0, y0), alpha)
        silhouette = np.asarray(alpha) > 127  # (side, side), as the sparse scenes' box
        mask[y0:y0 + sign.height, x0:x0 + sign.width][silhouette] = label + 1
        ys, xs = np.nonzero(silhouette)
        labels.append(label)
        boxes.append((x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1))
    img = _lighting(np.asarray(im, dtype=np.float32), rng)
    return DenseScene(image=Image.fromarray(img.astype(np.uint8)), mask=mask, labels=tuple(labels),
                      boxes=tuple(boxes))


class DenseSigns(Dataset):
    """`num_samples` dense scenes of one split, generated on the fly: (image, mask) pairs, both PIL
    (the mask mode 'L', values 0..14). `transform(image, mask)`, when given, maps the pair together."""

    def __init__(
            self,
            split: str = 'train',
            num_samples: int = 1000,
            img_size: int = 512,
            seed: int = 0,
            transform: Optional[Callable] = None,
            num_signs: Tuple[int, int] = NUM_SIGNS_RANGE,
            area_range: Tuple[float, float] = WIDE_AREA_RANGE,
    ):
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f'num_samples must be a positive int, got {num_samples!r}')
        self.split, self.num_samples, self.img_size, self.seed = split, num_samples, img_size, seed
        self.transform = transform
        self.num_signs, self.area_range = tuple(num_signs), tuple(area_range)
        self.classes = list(SEGMENTATION_CLASSES)

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> DenseScene:
        if not 0 <= index < self.num_samples:
            raise IndexError(f'index {index} out of range for {self.num_samples} scenes')
        return generate_dense_scene(self.seed, self.split, index, self.img_size, self.num_signs, self.area_range)

    def __getitem__(self, index: int):
        scene = self.scene(index)
        image, mask = scene.image, Image.fromarray(scene.mask)
        return self.transform(image, mask) if self.transform is not None else (image, mask)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(split={self.split}, num_samples={self.num_samples}, img_size={self.img_size}, '
                f'seed={self.seed}, num_signs={self.num_signs}, area_range={self.area_range})')


class DenseSceneTensors(Dataset):
    """`dense`'s scenes as (uint8 (3, H, W) image, uint8 (H, W) mask) tensors."""

    def __init__(self, dense: DenseSigns):
        self.dense = dense

    def __len__(self) -> int:
        return len(self.dense)

    def __getitem__(self, index: int):
        scene = self.dense.scene(index)
        return pil_to_tensor(scene.image), torch.from_numpy(scene.mask)


def write_segmentation_folder(
        root: str,
        split: str,
        num_samples: int,
        img_size: int = 512,
        seed: int = 0,
        progress: bool = True,
) -> str:
    """Write `root/images/<split>/<index>.png`, `root/annotations/<split>/<index>.png` (mode 'L', 0 background,
    1 + the sign's class) and `root/classes.txt` (one name a line, in mask-value order): the layout of ADE20K
    that segmentation tools read (mmsegmentation's ADE20KDataset with reduce_zero_label=False, HF datasets'
    imagefolder). Existing files are kept, so an interrupted export resumes. Returns `root`."""
    dense = DenseSigns(split, num_samples, img_size, seed)
    folders = [os.path.join(root, kind, split) for kind in ('images', 'annotations')]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    with replacing(os.path.join(root, 'classes.txt')) as tmp, open(tmp, 'w') as f:
        f.write('\n'.join(SEGMENTATION_CLASSES) + '\n')
    indices: Sequence[int] = range(num_samples)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc=f'writing {split}', unit='img', mininterval=5)
    for index in indices:
        image_path, mask_path = (os.path.join(folder, f'{index:06d}.png') for folder in folders)
        if os.path.exists(image_path) and os.path.exists(mask_path):
            continue
        scene = dense.scene(index)
        # the mask last: an image with its mask is whole, and a half-written pair is redone
        with replacing(image_path) as tmp:
            scene.image.save(tmp, format='PNG', compress_level=1)
        with replacing(mask_path) as tmp:
            Image.fromarray(scene.mask).save(tmp, format='PNG')
    return root

"""Reading image files into uint8 tensors: the pixels as stored, turned upright, at 8 bits.

    image = read_image('photo.jpg')                  # (3, H, W) uint8, EXIF orientation applied
    grey = read_image('scan.tif', channels=1)        # (1, H, W) uint8
    image = decode_image_bytes(data, name='s3://bucket/photo.jpg')   # bytes from elsewhere (Spark, Ray, S3)

JPEG, PNG, WebP and GIF decode with torchvision's decoders (libjpeg-turbo, libpng, libwebp, giflib); what
they cannot read, Pillow does (BMP, TIFF, PPM, ...; and GIF and WebP in grey, which torchvision gives in
colour). Either way an image comes out as a model wants it:
- upright: a photo's EXIF orientation is applied (phones store portraits on their side and say so there);
- at 8 bits: 16-bit PNGs and TIFFs are scaled, round(x / 257), where Pillow's mode conversion clips them at
  255 (a 16-bit PNG through `Image.convert('RGB')` is a few grey levels, nearly all white);
- in the model's channels: grey, grey + alpha, palette, RGBA, CMYK to RGB (alpha dropped), or to one grey channel.

A file that cannot give an image raises `ImageError`, whose `kind` names why (`IMAGE_ERROR_KINDS`): a missing
file, a folder, an empty file, a file that is not an image, a truncated one, one with more pixels than the
limit (Pillow's decompression-bomb limit unless `pixel_limit` says otherwise), one no decoder can read.
"""
import contextlib
import io
import numbers
import os
import threading
import warnings
from typing import Optional, Union

import numpy as np
import torch
import torchvision.io
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    'IMAGE_EXTENSIONS', 'IMAGE_ERROR_KINDS', 'ImageError', 'read_image', 'decode_image_bytes', 'pil_as_8bit',
    'pil_to_tensor', 'to_8bit',
]

# what a folder's image files end in (lower case); torchvision decodes the first four formats, Pillow the rest
IMAGE_EXTENSIONS = frozenset({
    '.jpg', '.jpeg', '.jpe', '.png', '.webp', '.gif', '.bmp', '.tif', '.tiff', '.ppm', '.pgm', '.pbm', '.pnm'})
# why a file gave no image: ImageError.kind
IMAGE_ERROR_KINDS = ('missing', 'folder', 'empty', 'not an image', 'truncated', 'too large', 'too small', 'unreadable')
# Pillow's names of the formats torchvision decodes (an MPO is a phone's JPEG with a second, depth, image)
_TORCHVISION_FORMATS = frozenset({'JPEG', 'MPO', 'PNG', 'WEBP', 'GIF'})
_TORCHVISION_DEPRECATION = 'The image decoding and encoding capabilities of TorchVision are deprecated'
_SIXTEEN_BIT_MODES = frozenset({'I;16', 'I;16L', 'I;16B', 'I;16N', 'I'})
_pillow_limit = threading.Lock()  # guards Image.MAX_IMAGE_PIXELS while a call with its own limit opens a file

Bytes = Union[bytes, bytearray, memoryview, np.ndarray, torch.Tensor]


class ImageError(ValueError):
    """A file (or bytes) that gave no image; `kind` is one of IMAGE_ERROR_KINDS, `path` the file's name."""

    def __init__(self, message: str, kind: str, path: Optional[str] = None):
        if kind not in IMAGE_ERROR_KINDS:
            raise ValueError(f'kind must be one of {IMAGE_ERROR_KINDS}, got {kind!r}')
        self.message, self.kind, self.path = message, kind, path
        super().__init__(f'{path}: {message}' if path else message)

    def __reduce__(self):  # raised in a DataLoader worker, it travels to the main process whole
        return type(self), (self.message, self.kind, self.path)


def read_image(
        path: Union[str, os.PathLike],
        channels: int = 3,
        pixel_limit: Optional[int] = None,
) -> torch.Tensor:
    """An image file -> (channels, H, W) uint8 tensor, upright (EXIF orientation), 16-bit scaled to 8.

    Args:
        path: the file.
        channels: 3 for RGB, 1 for grey.
        pixel_limit: refuse images of more than this many pixels before decoding them; None: Pillow's
            decompression-bomb limit (2 * PIL.Image.MAX_IMAGE_PIXELS, 179 MP by default).

    Raises:
        ImageError: the file gives no image; its `kind` says why.
    """
    if isinstance(path, (bytes, bytearray, memoryview)) and (len(path) > 4096 or b'\0' in bytes(path)):
        raise TypeError(f'read_image takes a path; these {len(path)} bytes look like a file\'s contents: decode '
                        'them with decode_image_bytes(data, name=...)')
    _check_pixel_limit(pixel_limit)
    path = os.fspath(path)
    if os.path.isdir(path):
        named = ' (its name ends like an image\'s)' if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS else ''
        raise ImageError(f'is a folder, not an image file{named}; pass the files in it', 'folder', path)
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(f'no such file (working directory {os.getcwd()})', 'missing', path) from None
    except OSError as err:
        raise ImageError(f'cannot be read: {err.strerror or err}', 'unreadable', path) from None
    return decode_image_bytes(data, channels, pixel_limit, name=path)


def decode_image_bytes(
        data: Bytes,
        channels: int = 3,
        pixel_limit: Optional[int] = None,
        name: Optional[str] = None,
) -> torch.Tensor:
    """An encoded image (a file's bytes) -> (channels, H, W) uint8 tensor, as `read_image`; `name` goes into errors.

    `data` is bytes, bytearray, memoryview, or a 1-D uint8 numpy array or tensor of the bytes (what
    torchvision.io.read_file gives); anything else (a path, a file object, a decoded image) raises a TypeError
    naming it.
    """
    if channels not in (1, 3):
        raise ValueError(f'channels must be 1 (grey) or 3 (RGB), got {channels}')
    _check_pixel_limit(pixel_limit)
    data = _as_bytes(data)
    if not data:
        raise ImageError('is empty (0 bytes): an interrupted copy or download?', 'empty', name)
    header = _open_header(data, pixel_limit, name)
    image = None
    if header.format in _TORCHVISION_FORMATS:
        mode = torchvision.io.ImageReadMode.RGB if channels == 3 else torchvision.io.ImageReadMode.GRAY
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec, whose images are not there yet
                warnings.filterwarnings('ignore', _TORCHVISION_DEPRECATION, DeprecationWarning)
                image = torchvision.io.decode_image(encoded, mode=mode, apply_exif_orientation=True)
        except RuntimeError:
            pass  # what libjpeg or libpng refuse, Pillow reads or names (a truncated file, say)
    if image is not None and image.dim() == 4:  # an animated GIF or WebP: its first frame
        image = image[0]
    if image is not None and image.shape[0] != channels:
        image = None  # a decoder that ignored the mode asked for (GIF and WebP give colour for grey): Pillow's
    if image is None:
        image = _decode_with_pillow(header, channels, name)
    return to_8bit(image)


def _as_bytes(data: Bytes) -> bytes:
    """An encoded file's bytes as `bytes`: bytes-like objects, and 1-D uint8 arrays or tensors of them."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        array = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else data
        if array.dtype != np.uint8 or array.ndim != 1:
            already = ' (an image already decoded?)' if array.ndim == 3 else ''
            raise TypeError(f'expected the encoded file\'s bytes as a 1-D uint8 array, got a {array.dtype} array of '
                            f'shape {list(array.shape)}{already}; e.g. torchvision.io.read_file(path) or '
                            'np.frombuffer(data, np.uint8)')
        return array.tobytes()
    if isinstance(data, (str, os.PathLike)):
        raise TypeError(f'expected the encoded file\'s bytes, got a path ({os.fspath(data)!r}): read it with '
                        'read_image(path)')
    if hasattr(data, 'read'):
        raise TypeError(f'expected the encoded file\'s bytes, got a file object ({type(data).__name__}): pass its '
                        'bytes, data.read()')
    raise TypeError(f'expected the encoded file\'s bytes (bytes, bytearray, memoryview, or a 1-D uint8 array or '
                    f'tensor), got {type(data).__name__}')


def _check_pixel_limit(pixel_limit: Optional[int]) -> None:
    if pixel_limit is None:
        return
    if isinstance(pixel_limit, bool) or not isinstance(pixel_limit, numbers.Real):
        raise TypeError(f'pixel_limit must be a number of pixels or None, got {pixel_limit!r}')
    if pixel_limit < 1:
        raise ValueError(f'pixel_limit must be at least 1 pixel (None: Pillow\'s limit), got {pixel_limit}')


def to_8bit(image: torch.Tensor) -> torch.Tensor:
    """uint8 stays; uint16 (a 16-bit PNG's samples) is scaled to the nearest 8-bit value, round(x / 257)."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype != torch.uint16:
        raise TypeError(f'expected uint8 or uint16 pixels, got {image.dtype}')
    return ((image.to(torch.int32) + 128) // 257).to(torch.uint8)


def pil_as_8bit(image: Image.Image, mode: str = 'RGB') -> Image.Image:
    """A PIL image of any mode -> `mode` ('RGB' or 'L'), upright by its EXIF orientation, 16-bit scaled to 8 bits
    (Pillow's own conversion clips 16-bit values at 255). 32-bit float images are refused: their range is unknown."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        samples = np.asarray(image).astype(np.int64)
        if samples.size and (samples.min() < 0 or samples.max() > 65535):
            raise ValueError(f'a {image.mode} image with values from {samples.min()} to {samples.max()}: not 8 or '
                             '16 bits; convert it to an 8-bit image first')
        image = Image.fromarray(((samples + 128) // 257).astype(np.uint8))  # mode 'L'
    elif image.mode == 'F':
        raise ValueError('a 32-bit float image: its range is unknown; convert it to an 8-bit image first')
    return image if image.mode == mode else image.convert(mode)


def pil_to_tensor(image: Image.Image, channels: int = 3) -> torch.Tensor:
    """A PIL image -> (channels, H, W) uint8 tensor, as `pil_as_8bit` makes it."""
    pixels = np.asarray(pil_as_8bit(image, 'RGB' if channels == 3 else 'L'))
    return torch.from_numpy(pixels.copy()).view(pixels.shape[0], pixels.shape[1], -1).permute(2, 0, 1).contiguous()


def _open_header(data: bytes, pixel_limit: Optional[int], name: Optional[str]) -> Image.Image:
    """Pillow's lazily opened image (the header read, no pixels decoded), its size checked against the limit."""
    with warnings.catch_warnings(), _own_limit(pixel_limit is not None):
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # the limit below decides
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise ImageError(f'{err}; raise PIL.Image.MAX_IMAGE_PIXELS or give a pixel limit (--pixel-limit) if '
                             'it is a real image', 'too large', name) from None
        except UnidentifiedImageError:
            raise ImageError(f'is not an image file Pillow or torchvision can read ({len(data)} bytes starting '
                             f'{data[:8]!r})', 'not an image', name) from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:  # a header cut short or malformed
            kind = 'truncated' if isinstance(err, EOFError) or 'truncated' in str(err).lower() else 'unreadable'
            raise ImageError(f'its header cannot be read ({err})', kind, name) from None
    width, height = image.size  # Pillow refuses a header of 0 pixels as no image
    if pixel_limit is not None and width * height > pixel_limit:
        raise ImageError(f'{width}x{height} is {width * height} pixels, more than the limit of {pixel_limit}; '
                         'raise the limit (--pixel-limit) if it is a real image', 'too large', name)
    return image


@contextlib.contextmanager
def _own_limit(active: bool):
    """With a caller's own pixel limit, Pillow's is lifted while the header is read (the caller's decides)."""
    if not active:
        yield
        return
    with _pillow_limit:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _decode_with_pillow(image: Image.Image, channels: int, name: Optional[str]) -> torch.Tensor:
    try:
        image.load()
    except OSError as err:
        kind = 'truncated' if 'truncated' in str(err).lower() or 'broken data stream' in str(err) else 'unreadable'
        way_out = ': re-copy or re-download it' if kind == 'truncated' else ''
        raise ImageError(f'cannot be decoded ({err}){way_out}', kind, name) from None
    try:
        return pil_to_tensor(image, channels)
    except (ValueError, OSError) as err:
        raise ImageError(f'a {image.format} image of mode {image.mode} that cannot be turned into 8-bit '
                         f'{"RGB" if channels == 3 else "grey"}: {err}', 'unreadable', name) from None

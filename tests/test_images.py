"""Reading image files into uint8 tensors (timm_lookwhere.images): upright by EXIF orientation, 16-bit scaled to 8
bits, every mode to RGB or grey, and each kind of bad file named; the float pipeline and `lookwhere demo --image`
read files the same way (issue 20 item 9)."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import tiny_model
from timm_lookwhere import demo
from timm_lookwhere.images import IMAGE_ERROR_KINDS, ImageError, decode_image_bytes, pil_as_8bit, read_image, to_8bit
from timm_lookwhere.native_size import create_native_transform

EXIF_ORIENTATION = 0x0112


def sixteen_bit_gradient(height=48, width=64):
    """Values spread over the whole 16-bit range: 8-bit clipping would leave a few grey levels."""
    return (np.arange(height * width).reshape(height, width) * (65535 // (height * width - 1))).astype(np.uint16)


def write_png16_rgb(path, pixels):
    """A 16-bit RGB PNG, written by hand (Pillow has no 48-bit mode to save from)."""
    height, width, _ = pixels.shape
    raw = b''.join(b'\x00' + pixels[y].astype('>u2').tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    header = struct.pack('>IIBBBBB', width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw))
                     + chunk(b'IEND', b''))


def halves(height=40, width=60):
    """Left half dark, right half bright, and a bright top-left corner: every orientation tells itself apart."""
    pixels = np.full((height, width, 3), 30, np.uint8)
    pixels[:, width // 2:] = 220
    pixels[:8, :8] = (250, 20, 20)
    return pixels


def write_with_orientation(path, pixels, orientation, **save_kwargs):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), **save_kwargs)


def upright(pixels, orientation):
    """What a viewer shows: Pillow's own reading of the orientation tag."""
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = orientation
    image.info['exif'] = exif.tobytes()
    return np.asarray(ImageOps.exif_transpose(image))


def hwc(tensor):
    return tensor.permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------------------------
# 16 bits


def test_a_sixteen_bit_grey_png_is_scaled_to_eight_bits_not_clipped(tmp_path):
    values = sixteen_bit_gradient()
    path = tmp_path / 'grey16.png'
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == 'I;16'
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, *values.shape)
    expected = np.round(values / 257).astype(np.uint8)
    assert np.array_equal(hwc(image)[..., 0], expected)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert len(torch.unique(image)) > 200  # clipping at 255 leaves a handful of levels
    assert torch.equal(read_image(path, channels=1)[0], image[0])


def test_a_sixteen_bit_rgb_png_is_scaled_to_eight_bits(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65536, (10, 12, 3)).astype(np.uint16)
    path = tmp_path / 'rgb16.png'
    write_png16_rgb(path, pixels)
    assert np.array_equal(hwc(read_image(path)), np.round(pixels / 257).astype(np.uint8))


def test_a_sixteen_bit_tiff_goes_through_pillow_scaled(tmp_path):
    values = sixteen_bit_gradient(20, 30)
    path = tmp_path / 'grey16.tif'
    Image.fromarray(values).save(path)
    assert np.array_equal(hwc(read_image(path))[..., 0], np.round(values / 257).astype(np.uint8))


def test_to_8bit_rounds_to_the_nearest_level():
    samples = torch.tensor([0, 128, 129, 257, 65535 - 128, 65535], dtype=torch.uint16)
    assert to_8bit(samples).tolist() == [round(v / 257) for v in samples.tolist()] == [0, 0, 1, 1, 255, 255]
    with pytest.raises(TypeError, match='uint8 or uint16'):
        to_8bit(torch.zeros(2, dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize('orientation', [3, 6, 8])
@pytest.mark.parametrize('suffix', ['.png', '.jpg'])
def test_exif_orientation_turns_the_image_upright(tmp_path, orientation, suffix):
    pixels = halves()
    path = tmp_path / f'photo{suffix}'
    write_with_orientation(path, pixels, orientation, **({'quality': 95} if suffix == '.jpg' else {}))
    image = hwc(read_image(path)).astype(int)
    expected = upright(pixels, orientation).astype(int)
    assert image.shape == expected.shape
    assert np.abs(image - expected).mean() < 3  # JPEG's loss, not a turned image (that differs by ~100)


def test_an_image_without_orientation_is_kept_as_stored(tmp_path):
    pixels = halves()
    Image.fromarray(pixels).save(tmp_path / 'plain.png')
    assert np.array_equal(hwc(read_image(tmp_path / 'plain.png')), pixels)


# --------------------------------------------------------------------------------------------
# modes and formats


@pytest.mark.parametrize('mode', ['L', 'LA', 'P', 'RGBA', 'CMYK', '1'])
def test_every_mode_becomes_rgb_as_pillow_converts_it(tmp_path, mode):
    source = Image.fromarray(halves())
    converted = source.convert(mode)
    suffix = '.jpg' if mode == 'CMYK' else '.png'
    path = tmp_path / f'image{suffix}'
    converted.save(path, **({'quality': 100} if suffix == '.jpg' else {}))
    image = read_image(path)
    assert image.shape == (3, 40, 60) and image.dtype == torch.uint8
    expected = np.asarray(Image.open(path).convert('RGB')).astype(int)
    assert np.abs(hwc(image).astype(int) - expected).max() <= (3 if suffix == '.jpg' else 0)
    grey = read_image(path, channels=1)
    assert grey.shape == (1, 40, 60)


@pytest.mark.parametrize('suffix', ['.bmp', '.tif', '.ppm', '.webp', '.gif'])
def test_formats_read_through_torchvision_or_pillow(tmp_path, suffix):
    pixels = halves()
    path = tmp_path / f'image{suffix}'
    Image.fromarray(pixels).save(path, **({'lossless': True} if suffix == '.webp' else {}))
    expected = np.asarray(Image.open(path).convert('RGB'))
    assert np.array_equal(hwc(read_image(path)), expected)


def test_an_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((16, 24, 3), level, np.uint8)) for level in (40, 200)]
    path = tmp_path / 'anim.gif'
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image = read_image(path)
    assert image.shape == (3, 16, 24) and abs(int(image.float().mean()) - 40) <= 2


def test_bytes_decode_as_the_file_does(tmp_path):
    pixels = halves()
    path = tmp_path / 'photo.jpg'
    write_with_orientation(path, pixels, 6)
    data = path.read_bytes()
    expected = read_image(path)
    for given in (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8),
                  torch.frombuffer(bytearray(data), dtype=torch.uint8)):
        assert torch.equal(decode_image_bytes(given, name='s3://bucket/photo.jpg'), expected)


# --------------------------------------------------------------------------------------------
# bad files


def write_bad(tmp_path, kind):
    good = tmp_path / 'good.jpg'
    Image.fromarray(halves()).save(good, quality=90)
    path = tmp_path / f'bad-{kind.replace(" ", "-")}.jpg'
    if kind == 'missing':
        pass
    elif kind == 'folder':
        path.mkdir()
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'not an image':
        path.write_text('these are not the pixels you are looking for\n')
    elif kind == 'truncated':
        path.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    elif kind == 'truncated png':
        png = tmp_path / 'good.png'
        Image.fromarray(halves()).save(png)
        path = tmp_path / 'cut.png'
        path.write_bytes(png.read_bytes()[:-30])
    elif kind == 'no pixels':
        path = tmp_path / 'zero.png'  # a header claiming a 0 x 5 image
        header = struct.pack('>IIBBBBB', 0, 5, 8, 2, 0, 0, 0)
        path.write_bytes(b'\x89PNG\r\n\x1a\n' + struct.pack('>I', 13) + b'IHDR' + header + b'\0' * 4)
    return path


@pytest.mark.parametrize('case, kind, words', [
    ('missing', 'missing', 'no such file'),
    ('folder', 'folder', 'is a folder'),
    ('empty', 'empty', '0 bytes'),
    ('not an image', 'not an image', 'not an image file'),
    ('truncated', 'truncated', 'truncated'),
    ('truncated png', 'truncated', 'truncated'),
    ('no pixels', 'not an image', 'not an image file'),  # a header of 0 x 5 pixels
])
def test_a_bad_file_raises_an_image_error_naming_its_kind(tmp_path, case, kind, words):
    path = write_bad(tmp_path, case)
    with pytest.raises(ImageError) as error:
        read_image(path)
    assert error.value.kind == kind and error.value.path == str(path)
    assert str(error.value).startswith(f'{path}: ') and words in str(error.value)
    assert isinstance(error.value, ValueError)


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / 'big.png'
    Image.fromarray(halves(100, 200)).save(path)
    with pytest.raises(ImageError, match='20000 pixels, more than the limit of 19999') as error:
        read_image(path, pixel_limit=19_999)
    assert error.value.kind == 'too large'
    assert read_image(path, pixel_limit=20_000).shape == (3, 100, 200)
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 5_000)  # Pillow's own limit: refused beyond twice it
    with pytest.raises(ImageError, match='decompression bomb') as error:
        read_image(path)
    assert error.value.kind == 'too large'
    assert read_image(path, pixel_limit=10 ** 6).shape == (3, 100, 200)  # a limit of the caller's own replaces it
    assert Image.MAX_IMAGE_PIXELS == 5_000  # and Pillow's is back


def test_image_errors_cross_process_boundaries_whole():
    import pickle
    error = pickle.loads(pickle.dumps(ImageError('is empty', 'empty', 'a.jpg')))
    assert (error.kind, error.path, str(error)) == ('empty', 'a.jpg', 'a.jpg: is empty')
    assert set(IMAGE_ERROR_KINDS) >= {'missing', 'folder', 'empty', 'not an image', 'truncated', 'too large'}
    with pytest.raises(ValueError, match='kind must be one of'):
        ImageError('x', 'odd')


def test_float_images_are_refused_with_the_way_out():
    with pytest.raises(ValueError, match='32-bit float'):
        pil_as_8bit(Image.fromarray(np.zeros((4, 4), np.float32)))


# --------------------------------------------------------------------------------------------
# issue 20 item 9: the float pipeline and `lookwhere demo --image` read files the same way


def normalised_pixels(model, pixels):
    mean, std = (torch.tensor(model.pretrained_cfg[key]).view(3, 1, 1) for key in ('mean', 'std'))
    return (torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255 - mean) / std


def test_native_transform_scales_a_sixteen_bit_png(tmp_path):
    model = tiny_model(dynamic_img_size=True, dynamic_img_pad=True)
    values = sixteen_bit_gradient()
    Image.fromarray(values).save(tmp_path / 'grey16.png')
    x = create_native_transform(model)(Image.open(tmp_path / 'grey16.png'))
    expected = normalised_pixels(model, np.repeat(np.round(values / 257).astype(np.uint8)[..., None], 3, axis=2))
    assert torch.allclose(x, expected, atol=1e-6)


def test_native_transform_turns_a_photo_upright(tmp_path):
    model = tiny_model(dynamic_img_size=True, dynamic_img_pad=True)
    photo = halves()
    write_with_orientation(tmp_path / 'portrait.png', photo, 6)
    x = create_native_transform(model)(Image.open(tmp_path / 'portrait.png'))
    assert x.shape == (3, 60, 40)  # stored 60 wide, shown 40 wide
    assert torch.allclose(x, normalised_pixels(model, upright(photo, 6)), atol=1e-6)


def test_native_transform_through_timm_dataset_reads_the_file_as_stored(tmp_path):
    from timm.data import create_dataset
    folder = tmp_path / 'data' / 'a'
    folder.mkdir(parents=True)
    values = sixteen_bit_gradient()
    Image.fromarray(values).save(folder / 'grey16.png')
    model = tiny_model(dynamic_img_size=True, dynamic_img_pad=True)
    dataset = create_dataset('', root=str(tmp_path / 'data'), input_img_mode=None,
                             transform=create_native_transform(model))
    x, _ = dataset[0]
    mean, std = model.pretrained_cfg['mean'][0], model.pretrained_cfg['std'][0]
    assert len(torch.unique(x[0])) > 200 and abs(float(x[0].max()) * std + mean - values.max() / 65535) < 0.01


def test_the_native_transform_keeps_the_numbers_of_an_rgb_image():
    pixels = np.random.default_rng(1).integers(0, 256, (30, 50, 3)).astype(np.uint8)
    model = tiny_model(dynamic_img_size=True, dynamic_img_pad=True)
    assert torch.equal(create_native_transform(model)(Image.fromarray(pixels)), normalised_pixels(model, pixels))


def test_demo_image_scales_a_sixteen_bit_png(tmp_path):
    values = sixteen_bit_gradient(64, 64)
    Image.fromarray(values).save(tmp_path / 'grey16.png')
    image = np.asarray(demo.load_image(str(tmp_path / 'grey16.png'), (64, 64)))
    assert np.array_equal(image[..., 0], np.round(values / 257).astype(np.uint8))


def test_demo_image_turns_a_photo_upright(tmp_path):
    photo = halves(64, 128)  # stored landscape, shown portrait: cropped square, the left/right halves become top/bottom
    write_with_orientation(tmp_path / 'portrait.jpg', photo, 6, quality=95)
    shown = np.asarray(demo.load_image(str(tmp_path / 'portrait.jpg'), (64, 64))).astype(int)
    turned = np.asarray(Image.fromarray(upright(photo, 6)).crop((0, 32, 64, 96))).astype(int)
    assert np.abs(shown - turned).mean() < 3


def test_demo_image_names_a_file_that_is_no_image(tmp_path):
    (tmp_path / 'notes.jpg').write_text('hello')
    with pytest.raises(ValueError, match='--image .*notes.jpg: is not an image file'):
        demo.load_image(str(tmp_path / 'notes.jpg'), (64, 64))

"""Bad input, third round, the cases found by probing (issue 20's last paragraph): the newest features used as a new
user would, with odd arguments and inputs. Each case ended cryptic (a traceback from deep inside torch or timm, a
message that named neither the problem nor the way out), silently wrong, or mid-run; each now ends in an error that
names both, or does the right thing."""
import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import timm
from conftest import TINY, tiny_model
from timm_lookwhere import PreferredSelection, RandomSelection, SelectionRecorder, create_segmenter, predict
from timm_lookwhere.images import ImageError, decode_image_bytes, read_image
from timm_lookwhere.predict import EXIT_OK, EXIT_USAGE, Predictor
from timm_lookwhere.segmentation_data import ADE20KFolder, write_ade20k_folder

TINY_KWARGS = [f'{key}={value}' for key, value in TINY.items()]
NUM_CLASSES = 5


def noise(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def encoded(pixels, fmt, **save_kwargs):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# images.read_image and decode_image_bytes


def animated_gif(path):
    frames = [Image.fromarray(noise(30, 40, seed=s)) for s in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


@pytest.mark.parametrize('kind', ['gif', 'animated gif', 'webp', 'rgba webp', 'animated webp'])
def test_a_grey_read_of_a_gif_or_webp_gives_one_channel_as_pillow_converts_it(tmp_path, kind):
    # torchvision's GIF and WebP decoders ignore the grey mode: a (3, H, W) or (4, H, W) came back for channels=1
    path = tmp_path / f'image.{kind.split()[-1]}'
    if kind == 'animated gif':
        animated_gif(path)
    elif kind == 'animated webp':
        frames = [Image.fromarray(noise(30, 40, seed=s)) for s in range(2)]
        frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
    else:
        pixels = noise(30, 40, 4 if kind == 'rgba webp' else 3)
        Image.fromarray(pixels).save(path, **({'lossless': True} if 'webp' in kind else {}))
    grey = read_image(path, channels=1)
    with Image.open(path) as image:  # the first frame, as a viewer shows it
        expected = np.asarray(image.convert('L'))
    assert grey.shape == (1, 30, 40) and grey.dtype == torch.uint8
    assert np.abs(grey[0].numpy().astype(int) - expected.astype(int)).max() <= 1
    assert read_image(path).shape == (3, 30, 40)


@pytest.mark.parametrize('data, words', [
    ('photo.png', 'got a path'),
    (None, 'got NoneType'),
    (5, 'got int'),  # bytes(5) was five zero bytes: "not an image"
    (np.arange(100, dtype=np.int64), 'got a int64 array'),  # its memory was read as the file
    (torch.rand(100), 'got a float32 array'),
    (torch.zeros(3, 8, 8, dtype=torch.uint8), 'an image already decoded?'),
    (io.BytesIO(b'x'), 'got a file object (BytesIO)'),
])
def test_decode_image_bytes_refuses_what_is_not_a_files_bytes_naming_it(data, words):
    with pytest.raises(TypeError, match='expected the encoded file') as info:
        decode_image_bytes(data)
    assert words in str(info.value)


def test_decode_image_bytes_takes_a_files_bytes_in_every_bytes_form():
    data = encoded(noise(12, 10), 'PNG')
    image = decode_image_bytes(data)
    for form in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8),
                 torch.frombuffer(bytearray(data), dtype=torch.uint8)):
        assert torch.equal(decode_image_bytes(form), image)


@pytest.mark.parametrize('limit, error', [(0, ValueError), (-1, ValueError), ('1000', TypeError)])
def test_a_pixel_limit_below_one_pixel_or_not_a_number_is_refused(tmp_path, limit, error):
    # 0 and -1 called every image of the folder 'too large'; '1000' failed comparing int with str
    path = tmp_path / 'a.png'
    Image.fromarray(noise(4, 4)).save(path)
    with pytest.raises(error, match='pixel_limit'):
        read_image(path, pixel_limit=limit)
    with pytest.raises(error, match='pixel_limit'):
        decode_image_bytes(path.read_bytes(), pixel_limit=limit)


def test_read_image_given_a_files_contents_points_to_decode_image_bytes():
    with pytest.raises(TypeError, match='decode_image_bytes'):  # was "embedded null byte"
        read_image(encoded(noise(8, 8), 'PNG'))


def test_a_folder_is_said_to_be_named_like_an_image_only_when_it_is(tmp_path):
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'odd.jpg').mkdir()
    with pytest.raises(ImageError) as plain:
        read_image(tmp_path / 'photos')
    with pytest.raises(ImageError) as named:
        read_image(tmp_path / 'odd.jpg')
    assert plain.value.kind == named.value.kind == 'folder'
    assert 'ends like an image' not in str(plain.value) and 'ends like an image' in str(named.value)


# --------------------------------------------------------------------------------------------
# lookwhere predict: arguments


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """Random tiny LookWhere weights of 5 classes with 3, 1 and 4 input channels, and a tiny ViT's of 7 classes."""
    folder = tmp_path_factory.mktemp('weights')
    paths = {}
    for chans in (3, 1, 4):
        model = tiny_model('lookwhere_vitb_518', num_classes=NUM_CLASSES, in_chans=chans)
        paths[chans] = folder / f'tiny{chans}.safetensors'
        save_file(model.state_dict(), str(paths[chans]))
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=1, num_classes=7)
    paths['vit'] = folder / 'vit.safetensors'
    save_file(vit.state_dict(), str(paths['vit']))
    return paths


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp('photos') / 'photos'
    folder.mkdir()
    Image.fromarray(noise(60, 80)).save(folder / 'a.png')
    Image.fromarray(noise(50, 40, seed=1)).save(folder / 'b.jpg', quality=90)
    Image.fromarray(noise(30, 50, seed=2)).save(folder / 'c.bmp')  # Pillow decodes it: a contiguous tensor
    animated_gif(folder / 'd.gif')
    return folder


def tiny_args(checkpoint, *model_kwargs):
    return ['--model', 'lookwhere_vitb_518', '--checkpoint', str(checkpoint), '--model-kwargs', *TINY_KWARGS,
            f'num_classes={NUM_CLASSES}', *model_kwargs]


def run_predict(*argv):
    return predict.main([str(a) for a in argv])


def test_a_one_channel_model_reads_every_file_in_grey_an_animated_gif_too(tmp_path, photos, checkpoints):
    # the GIF came back in RGB and ended the run in a DataLoader worker's traceback
    output = tmp_path / 'out'
    code = run_predict(photos, '--output', output, *tiny_args(checkpoints[1], 'in_chans=1'), '--workers', '0',
                       '--quiet')
    assert code == EXIT_OK
    import pyarrow.parquet as pq
    assert pq.read_table(output / 'predictions').num_rows == 4


VIT = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'depth=1']


@pytest.mark.parametrize('case, argv, words', [
    ('a model of 4 channels', lambda c, t: tiny_args(c[4], 'in_chans=4'),
     ['takes 4 channels', 'RGB (3 channels) or grey (1)']),  # was a worker's traceback after the folder was made
    ('a device that is none', lambda c, t: [*tiny_args(c[3]), '--device', 'nonsense'],
     ["--device 'nonsense' is not a device", 'cpu, cuda or cuda:N']),
    ('class names missing', lambda c, t: [*tiny_args(c[3]), '--class-names', t / 'nowhere.txt'],
     ['--class-names', 'nowhere.txt: No such file']),
    ('class names not text', lambda c, t: [*tiny_args(c[3]), '--class-names', t / 'binary.txt'],
     ['--class-names', 'not UTF-8 text']),
    ('a list file not text', lambda c, t: [t / 'binary.txt', *tiny_args(c[3])],
     ['binary.txt cannot be read as a text file of paths: not UTF-8 text']),
    ('an output under a file', lambda c, t: [*tiny_args(c[3]), '--output', t / 'a-file' / 'out'],
     ['--output', 'cannot be made or written']),
    ('max pixels below a patch', lambda c, t: [*tiny_args(c[3]), '--max-pixels', '1'],
     ['--max-pixels 1 is less than one 14x14 patch', 'give at least 196']),  # ran, every image a pixel
    ('a typo in the architecture', lambda c, t: ['--model', 'lookwhere_vitt16_152.sparse_signs'],
     ['Unknown model', 'did you mean lookwhere_vitt16_512.sparse_signs']),
    ('a typo in the tag', lambda c, t: ['--model', 'lookwhere_vitt16_512.dense_sign'],
     ["no weights tagged 'dense_sign'", 'lookwhere_vitt16_512.dense_signs']),
    ('another number of classes than the weights', lambda c, t: [*tiny_args(c[3]), 'num_classes=7'],
     ['num_classes=7', 'a classifier of 5 classes', 'untrained']),  # ran with a random head
    ('another number of classes than the shipped weights',
     lambda c, t: ['--model', 'lookwhere_vitt16_512.sparse_signs', '--model-kwargs', 'num_classes=3'],
     ['num_classes=3', 'a classifier of 14 classes']),
    ("a LookWhere's weights for a ViT", lambda c, t: [*VIT, '--checkpoint', c[3]],
     ["holds a LookWhere's weights", 'give --model the LookWhere']),  # was "shape '[1, 7, 7, -1]' is invalid"
    ("a ViT's weights for a ResNet", lambda c, t: ['--model', 'resnet18', '--checkpoint', c['vit']],
     ['does not fit resnet18', 'Give the --model (and --model-kwargs) it was saved with']),
    ('a LookWhere of another width', lambda c, t: tiny_args(c[3], 'embed_dim=64'),  # was 57 lines of size mismatches
     ['does not fit lookwhere_vitb_518', 'size mismatch for pos_embed', '(and 56 more)']),
])
def test_argument_errors_found_by_probing_name_the_problem_and_the_way_out(
        tmp_path, photos, checkpoints, capsys, case, argv, words):
    (tmp_path / 'binary.txt').write_bytes(b'\xff\xfe\x00 not text')
    (tmp_path / 'a-file').write_text('x')
    argv = argv(checkpoints, tmp_path)
    inputs = [] if str(tmp_path / 'binary.txt') == str(argv[0]) else [photos]
    output = [] if '--output' in argv else ['--output', tmp_path / 'out']
    code = run_predict(*inputs, *argv, *output, '--workers', '0', '--quiet')
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err[-2000:]
    assert err.startswith('lookwhere predict: error: ') and 'Traceback' not in err
    for word in words:
        assert word in err
    assert not (tmp_path / 'out').exists()


def test_a_segmenter_takes_class_names_for_its_mask_values(tmp_path, photos):
    # they were compared with the 0 classes of an image classifier: refused whatever their number
    names = tmp_path / 'names.txt'
    names.write_text(''.join(f'class {i}\n' for i in range(15)))
    output = tmp_path / 'out'
    code = run_predict(photos / 'a.png', '--output', output, '--model', 'lookwhere_vitt16_512.dense_signs',
                       '--class-names', names, '--workers', '0', '--quiet')
    assert code == EXIT_OK
    assert json.loads((output / 'manifest.json').read_text())['model']['class_names'] == [
        f'class {i}' for i in range(15)]


def test_a_cuda_device_beyond_the_machines_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    with pytest.raises(ValueError, match=r'--device cuda:3: this machine has 1 CUDA device \(cuda:0 to cuda:0\)'):
        predict._device('cuda:3', predict._Launch())


# --------------------------------------------------------------------------------------------
# Predictor, the library API


@pytest.fixture(scope='module')
def lookwhere():
    return tiny_model(num_classes=NUM_CLASSES, dynamic_img_size=True, dynamic_img_pad=True)


def uint8_images():
    return [torch.from_numpy(noise(50, 70)).permute(2, 0, 1), torch.from_numpy(noise(112, 30, seed=1)).permute(2, 0, 1)]


@pytest.mark.parametrize('kwargs, error, words', [
    (dict(top_k=-1), ValueError, 'top_k'),  # was "selected index k out of range" at the first batch
    (dict(top_k=2.5), ValueError, 'top_k'),
    (dict(amp_dtype=torch.float32), ValueError, 'torch.bfloat16 or torch.float16'),  # autocast off, with a warning
    (dict(names=['a', 'b']), ValueError, '2 class names for the 5 classes'),  # an IndexError at the first batch
    (dict(max_pixels=0), ValueError, 'less than one 14x14 patch'),  # an INTERNAL ASSERT inside torch's resize
    (dict(max_pixels=-5), ValueError, 'less than one 14x14 patch'),  # "math domain error"
])
def test_predictor_arguments_are_checked_when_it_is_made(lookwhere, kwargs, error, words):
    with pytest.raises(error, match=words):
        Predictor(lookwhere, **kwargs)


def test_predictor_takes_the_amp_dtype_by_name(lookwhere):
    images = uint8_images()
    by_name = Predictor(lookwhere, amp_dtype='bfloat16')(images)  # was a TypeError inside torch.autocast
    by_dtype = Predictor(lookwhere, amp_dtype=torch.bfloat16)(images)
    assert [r['top_probs'] for r in by_name] == [r['top_probs'] for r in by_dtype]


@pytest.mark.parametrize('images, error, words', [
    (lambda: [uint8_images()[0].permute(1, 2, 0)], ValueError, r'an \(H, W, C\) image\? Give image.permute'),
    (lambda: uint8_images()[0], TypeError, r'got one image of shape \[3, 50, 70\]: give \[image\]'),
    (lambda: [uint8_images()[0][:, :0]], ImageError, 'has no pixels'),
])
def test_predictor_names_an_image_of_the_wrong_form(lookwhere, images, error, words):
    with pytest.raises(error, match=words):
        Predictor(lookwhere)(images())


def test_predictor_runs_a_timm_model_in_its_own_dtype():
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=1, num_classes=3).eval()
    images = uint8_images()
    rows = Predictor(vit)(images)
    half = Predictor(copy.deepcopy(vit).to(torch.bfloat16))(images)  # was a conv error: float input, bfloat16 bias
    for row, other in zip(rows, half):
        assert np.allclose(row['top_probs'], other['top_probs'], atol=0.02)


def test_predictor_normalises_a_grey_timm_model_with_one_mean_and_std():
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=1, num_classes=3, in_chans=1).eval()
    image = torch.from_numpy(noise(32, 32, 1)).permute(2, 0, 1)
    predictor = Predictor(vit)
    row = predictor([image])[0]  # ImageNet's 3 means made the grey image 3 channels: a conv error
    mean, std = np.mean(vit.pretrained_cfg['mean']), np.mean(vit.pretrained_cfg['std'])
    with torch.no_grad():  # resized and cropped as its cfg says, then normalised with the means of the three
        expected = vit(((predictor.prepare(image).float() / 255 - mean) / std)[None]).softmax(-1)[0]
    assert np.allclose(row['top_probs'], expected.sort(descending=True).values.tolist(), atol=1e-5)


# --------------------------------------------------------------------------------------------
# the selection hooks


def chosen(model, images, hook):
    with hook, SelectionRecorder(model) as recorder:
        with torch.no_grad():
            model(images)
    return [record['indices'] for record in recorder.records]


def test_random_selection_takes_a_numpy_seed_and_refuses_a_float_one():
    model = tiny_model(num_classes=NUM_CLASSES)
    images = torch.randn(2, 3, 112, 112)
    assert torch.equal(chosen(model, images, RandomSelection(model, seed=np.int64(3)))[0],
                       chosen(model, images, RandomSelection(model, seed=3))[0])  # np.int64: "an integer is required"
    with pytest.raises(TypeError, match='seed must be an int, got 1.5'):  # at the with block, inside torch
        RandomSelection(model, seed=1.5)
    with pytest.raises(ValueError, match='seed must be in'):
        RandomSelection(model, seed=2 ** 70)


def test_the_hooks_go_on_a_segmenters_backbone():
    segmenter = create_segmenter('lookwhere_vitb_518', num_classes=3, **TINY).eval()
    images = torch.randn(1, 3, 112, 112)
    records = chosen(segmenter, images, RandomSelection(segmenter, seed=0))  # 'no attribute topk' before
    assert torch.equal(records[0], chosen(segmenter.backbone, images, RandomSelection(segmenter.backbone, seed=0))[0])
    with pytest.raises(TypeError, match='hooks the top-k of a LookWhere model'):
        PreferredSelection(torch.nn.Linear(2, 2), [[0]])


def test_preferred_selection_reads_a_bool_mask_per_image_as_a_mask():
    # a (N,) bool mask per image was read as the ids 0 and 1; a numpy (n, N) bool array likewise
    model = tiny_model(num_classes=NUM_CLASSES)
    images = torch.randn(2, 3, 112, 112)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, [10, 20, 30]] = True
    mask[1, [5, 40]] = True
    expected = chosen(model, images, PreferredSelection(model, mask))[0]
    for given in (list(mask), mask.numpy(), list(mask.numpy()), [[10, 20, 30], [5, 40]]):
        assert torch.equal(chosen(model, images, PreferredSelection(model, given))[0], expected)
    assert set(expected[0, :3].tolist()) == {10, 20, 30} and set(expected[1, :2].tolist()) == {5, 40}


def test_preferred_selection_takes_a_generator_and_refuses_what_holds_no_ids():
    model = tiny_model(num_classes=NUM_CLASSES)
    images = torch.randn(2, 3, 112, 112)
    assert torch.equal(chosen(model, images, PreferredSelection(model, (ids for ids in [[3], [4]])))[0],
                       chosen(model, images, PreferredSelection(model, [[3], [4]]))[0])  # "has no len()" before
    with pytest.raises(TypeError, match='patch ids are whole numbers'):  # 0.5 and 1.2 became 0 and 1
        chosen(model, images, PreferredSelection(model, [[0.5, 1.2], [3.0]]))
    with pytest.raises(TypeError, match='of image 0: expected a collection of patch ids'):
        chosen(model, images, PreferredSelection(model, [None, None]))
    with pytest.raises(TypeError, match='got a dict'):  # "unhashable type: 'slice'" at the first forward
        PreferredSelection(model, {0: [1], 1: [2]})


# --------------------------------------------------------------------------------------------
# segmentation_data


@pytest.fixture
def ade(tmp_path):
    pairs = [(torch.from_numpy(noise(20 + i, 30, seed=i)).permute(2, 0, 1).contiguous(),
              torch.from_numpy(np.random.default_rng(i).integers(0, 5, (20 + i, 30)))) for i in range(2)]
    return write_ade20k_folder(tmp_path / 'ade', 'training', pairs), pairs


@pytest.mark.parametrize('img_size', [0, -1, (0, 10), (20,), '32', 1.5, (16, 24, 3)])
def test_an_img_size_that_is_no_size_is_refused_when_the_dataset_is_made(ade, img_size):
    # 0 and (0, 10) failed inside F.interpolate at the first item; (20,) resized the shorter side only
    with pytest.raises(ValueError, match=r'img_size must be an int \(a square side\) or \(H, W\)'):
        ADE20KFolder(ade[0], 'training', num_classes=5, img_size=img_size)


def test_an_img_size_as_a_list_of_two_still_resizes_both_sides(ade):
    image, mask = ADE20KFolder(ade[0], 'training', num_classes=5, img_size=[16, 24])[0]
    assert image.shape == (3, 16, 24) and mask.shape == (16, 24)


def test_missing_annotations_name_what_the_folder_holds_and_the_suffixes(ade):
    with pytest.raises(FileNotFoundError) as info:
        ADE20KFolder(ade[0], 'training', num_classes=5, image_suffix='jpg')  # looked for '000000..png'
    assert 'holds 000000.png, 000001.png' in str(info.value) and "image_suffix='jpg'" in str(info.value)
    assert 'are the two suffixes right?' in str(info.value)


def test_write_ade20k_folder_names_a_numpy_image_and_a_mask_of_fractions(tmp_path):
    with pytest.raises(TypeError, match=r'got ndarray \(for an \(H, W, 3\) uint8 array: PIL.Image.fromarray'):
        write_ade20k_folder(tmp_path / 'a', 'x', [(noise(4, 4), torch.zeros(4, 4, dtype=torch.long))])
    with pytest.raises(ValueError, match='a mask holds whole class ids'):  # 1.7 was written as 1
        write_ade20k_folder(tmp_path / 'b', 'x', [(Image.new('RGB', (4, 4)), torch.full((4, 4), 1.7))])
    write_ade20k_folder(tmp_path / 'c', 'x', [(Image.new('RGB', (4, 4)), torch.full((4, 4), 2.0))])  # whole: kept
    assert ADE20KFolder(tmp_path / 'c', 'x', num_classes=5)[0][1].unique().tolist() == [2]

"""`lookwhere predict` and its library API (timm_lookwhere.predict): the schema read back, rows equal to the model's
own outputs, batch invariance on uint8 lists, bad files recorded, the output folder's guard, and torchrun on two
simulated nodes killed and launched again (with another process count) ending equal to an uninterrupted run."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import timm
from conftest import TINY, tiny_model
from test_images import halves, sixteen_bit_gradient, write_with_orientation
from timm_lookwhere import cli, predict
from timm_lookwhere.images import read_image
from timm_lookwhere.predict import (
    ERROR_COLUMNS, EXIT_BAD_FILES, EXIT_OK, EXIT_STRICT, EXIT_USAGE, PREDICTION_COLUMNS, Predictor, list_image_files,
)
from timm_lookwhere.scenes import CLASS_NAMES, SEGMENTATION_CLASSES, generate_dense_scene, generate_scene

TINY_NAME = 'lookwhere_vitb_518'
TINY_KWARGS = [f'{key}={value}' for key, value in TINY.items()]
NUM_CLASSES = 5
# sides of the generated photos: squares, portraits, panoramas, one smaller than a patch, one beyond 2 px of a patch
SIZES = [(112, 112), (60, 150), (150, 60), (200, 90), (33, 47), (13, 9), (128, 96), (96, 128), (70, 70), (41, 180),
         (180, 41), (100, 30), (15, 200), (64, 64)]


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """A random tiny LookWhere's weights, as a user's --checkpoint."""
    model = tiny_model(TINY_NAME, num_classes=NUM_CLASSES)
    path = tmp_path_factory.mktemp('weights') / 'tiny.safetensors'
    save_file(model.state_dict(), str(path))
    return path


def tiny_args(checkpoint, *extra):
    return ['--model', TINY_NAME, '--checkpoint', str(checkpoint), '--model-kwargs', *TINY_KWARGS,
            f'num_classes={NUM_CLASSES}', *extra]


def tiny_predictor(checkpoint, **kwargs):
    return Predictor.from_name(TINY_NAME, checkpoint=str(checkpoint), model_kwargs=dict(TINY, num_classes=NUM_CLASSES),
                               **kwargs)


def write_photos(folder, with_bad=True):
    """Generated scenes of mixed sizes (JPEG q90 and PNG, in subfolders), a 16-bit PNG and a portrait by EXIF; with
    `with_bad`, a truncated JPEG, a text file named .png and an empty file too. Returns {kind: [paths]}."""
    folder.mkdir(parents=True, exist_ok=True)
    made = dict(good=[], bad=[])
    for i, (width, height) in enumerate(SIZES):
        scene = generate_scene(0, 'test', i, img_size=128).image.resize((width, height), Image.BICUBIC)
        sub = folder / ('jpeg' if i % 2 else 'png') / f'set{i % 3}'
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f'scene{i:02d}.{"jpg" if i % 2 else "png"}'
        scene.save(path, **({'quality': 90} if i % 2 else {}))
        made['good'].append(path)
    Image.fromarray(sixteen_bit_gradient(50, 70)).save(folder / 'grey16.png')
    write_with_orientation(folder / 'portrait.jpg', halves(48, 96), 6, quality=90)
    made['good'] += [folder / 'grey16.png', folder / 'portrait.jpg']
    if with_bad:
        whole = (folder / 'jpeg' / 'set1' / 'scene01.jpg').read_bytes()
        (folder / 'cut.jpg').write_bytes(whole[:len(whole) // 2])
        (folder / 'notes.png').write_text('not pixels\n')
        (folder / 'empty.jpg').write_bytes(b'')
        made['bad'] += [folder / 'cut.jpg', folder / 'notes.png', folder / 'empty.jpg']
    (folder / 'README.md').write_text('not an image file: never listed\n')
    return made


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp('photos') / 'photos'
    return folder, write_photos(folder)


def read_table(folder):
    """A folder of parts as one table, sorted by index (pyarrow reads a folder of parts as a dataset)."""
    return pq.read_table(folder).sort_by('index')


def run_predict(*argv):
    return predict.main([str(a) for a in argv])


# --------------------------------------------------------------------------------------------
# the output: schema, values, manifest


@pytest.fixture(scope='module')
def finished(photos, tiny_checkpoint, tmp_path_factory):
    """One run with every optional column asked for: (output, exit code)."""
    folder, _ = photos
    output = tmp_path_factory.mktemp('finished') / 'out'
    code = run_predict(folder, '--output', output, *tiny_args(tiny_checkpoint), '--features', '--selection', '--dense',
                       '--top-k', '3', '--workers', '2', '--batch-size', '3', '--quiet')
    return output, code


def test_the_output_has_the_documented_schema_read_back_with_pyarrow_and_pandas(finished, photos):
    output, code = finished
    assert code == EXIT_BAD_FILES  # three bad files among the photos
    table = read_table(output / 'predictions')
    assert table.column_names == [name for name, _, _ in PREDICTION_COLUMNS]
    for name, kind, about in PREDICTION_COLUMNS:
        field = table.schema.field(name)
        assert field.type == kind and field.metadata[b'description'].decode() == about
    errors = read_table(output / 'errors')
    assert errors.column_names == [name for name, _, _ in ERROR_COLUMNS]
    folder, made = photos
    assert sorted(table['path'].to_pylist()) == sorted(os.path.normpath(p) for p in map(str, made['good']))
    assert table.num_rows + errors.num_rows == len(made['good']) + len(made['bad'])
    assert sorted(table['index'].to_pylist() + errors['index'].to_pylist()) == list(range(table.num_rows + len(errors)))
    frame = pandas.read_parquet(output / 'predictions')
    assert len(frame) == table.num_rows and list(frame.columns) == table.column_names


def test_rows_hold_the_models_own_outputs_on_the_files_uint8_pixels(finished, tiny_checkpoint):
    output, _ = finished
    table = read_table(output / 'predictions').to_pylist()
    model = predict.create_model(TINY_NAME, checkpoint=str(tiny_checkpoint), **dict(TINY, num_classes=NUM_CLASSES))
    dense = load_file(str(output / table[0]['dense_file']))
    with torch.no_grad():
        images = [read_image(row['path']) for row in table]
        everything = model.forward_all(images)
        probs = model.forward_head(everything['tokens'], patch_valid=everything['patch_valid']).softmax(-1)
        pooled = model.forward_head(everything['tokens'], pre_logits=True, patch_valid=everything['patch_valid'])
        maps = model.forward_dense(images)
    for i, row in enumerate(table):
        assert (row['width'], row['height']) == (images[i].shape[2], images[i].shape[1])
        assert (row['input_width'], row['input_height']) == (row['width'], row['height'])  # own size
        assert (row['grid_rows'], row['grid_cols']) == tuple(everything['grid_size'][i])
        assert row['k'] == len(row['selection']) == len(everything['indices'][i])
        assert set(row['selection']) == set(everything['indices'][i].tolist())
        expected = probs[i].topk(3)
        assert set(row['top_indices']) == set(expected.indices.tolist()) or \
            np.allclose(sorted(row['top_probs']), sorted(expected.values.tolist()), atol=1e-5)  # near-ties may swap
        assert np.allclose(row['top_probs'], expected.values.tolist(), atol=1e-5)
        assert np.allclose(row['features'], pooled[i].tolist(), atol=1e-5)
        assert row['top_names'] is None and row['mask_file'] is None  # random classes have no names; no segmenter
        if row['dense_file'] == table[0]['dense_file']:
            assert torch.allclose(dense[str(row['index'])], maps[i], atol=1e-5)


def test_the_exif_portrait_and_the_sixteen_bit_png_arrive_upright_and_scaled(finished):
    output, _ = finished
    rows = {Path(row['path']).name: row for row in read_table(output / 'predictions').to_pylist()}
    assert (rows['portrait.jpg']['width'], rows['portrait.jpg']['height']) == (48, 96)  # stored 96 x 48, on its side
    assert (rows['grey16.png']['width'], rows['grey16.png']['height']) == (70, 50)


def test_bad_files_are_recorded_with_their_reason_and_counted(finished, photos):
    output, _ = finished
    errors = {Path(row['path']).name: row for row in read_table(output / 'errors').to_pylist()}
    assert {name: row['kind'] for name, row in errors.items()} == {
        'cut.jpg': 'truncated', 'notes.png': 'not an image', 'empty.jpg': 'empty'}
    assert '0 bytes' in errors['empty.jpg']['error']
    manifest = json.loads((output / 'manifest.json').read_text())
    assert manifest['status'] == 'complete'
    assert manifest['counts']['errors'] == 3 and manifest['counts']['predicted'] == len(photos[1]['good'])
    assert manifest['counts']['errors_by_kind'] == {'truncated': 1, 'not an image': 1, 'empty': 1}


def test_the_manifest_says_what_ran(finished, tiny_checkpoint):
    output, _ = finished
    manifest = json.loads((output / 'manifest.json').read_text())
    assert manifest['model']['name'] == TINY_NAME and manifest['model']['checkpoint'] == str(tiny_checkpoint)
    assert manifest['model']['k_ratio'] == 0.1 and manifest['model']['own_size'] is True
    assert manifest['settings']['features'] and manifest['settings']['dense'] and manifest['settings']['top_k'] == 3
    assert set(manifest['versions']) >= {'timm_lookwhere', 'timm', 'torch', 'torchvision', 'pyarrow', 'python'}
    assert manifest['schema']['predictions']['top_probs'] == 'list<item: float>'
    assert manifest['parts']['count'] == len(os.listdir(output / 'predictions'))
    [launch] = manifest['launches']
    assert (launch['status'], launch['processes'], launch['images']) == ('finished', 1, manifest['counts']['files'])


def test_the_predictions_are_written_whole_part_by_part(finished):
    output, _ = finished
    manifest = json.loads((output / 'manifest.json').read_text())
    size, count = manifest['parts']['size'], manifest['parts']['count']
    for c in range(count):
        indices = pq.read_table(output / 'predictions' / f'part-{c:05d}.parquet')['index'].to_pylist()
        errors = output / 'errors' / f'part-{c:05d}.parquet'
        indices += pq.read_table(errors)['index'].to_pylist() if errors.exists() else []
        assert sorted(indices) == list(range(c * size, min((c + 1) * size, manifest['counts']['files'])))
    assert not [name for _, _, names in os.walk(output) for name in names if name.endswith('.tmp')]


def test_the_docs_page_lists_every_column_with_its_type():
    page = (Path(__file__).parents[1] / 'docs' / 'predict.md').read_text()
    documented = {}
    for line in page.splitlines():
        cells = [cell.strip() for cell in line.strip('|').split('|')] if line.startswith('| `') else []
        for name in (cells[0].replace('`', '').split(', ') if cells else []):
            documented[name] = cells[1].replace('\\', '')
    types = {'int64': 'int64', 'int32': 'int32', 'string': 'string', 'list<item: int32>': 'list<int32>',
             'list<item: float>': 'list<float32>', 'list<item: string>': 'list<string>'}
    assert documented == {name: types[str(kind)] for name, kind, _ in PREDICTION_COLUMNS}
    for name, kind, _ in ERROR_COLUMNS:
        assert f'`{name}` ({kind})' in page


# --------------------------------------------------------------------------------------------
# the library API


def test_an_images_row_is_the_same_alone_or_in_any_batch(tiny_checkpoint, photos):
    _, made = photos
    predictor = tiny_predictor(tiny_checkpoint, features=True, selection=True)
    images = [read_image(path) for path in made['good']]
    together = predictor(images)
    reordered = predictor(images[::-1])[::-1]
    for i, image in enumerate(images):
        alone = predictor([image])[0]
        for other in (together[i], reordered[i]):
            assert set(other['selection']) == set(alone['selection'])
            assert np.allclose(other['features'], alone['features'], atol=1e-5)
            assert np.allclose(other['top_probs'], alone['top_probs'], atol=1e-5)
            assert (other['width'], other['height'], other['k']) == (alone['width'], alone['height'], alone['k'])


def test_the_steps_run_apart_as_a_benchmark_times_them(tiny_checkpoint, photos):
    _, made = photos
    predictor = tiny_predictor(tiny_checkpoint)
    images = [read_image(path) for path in made['good'][:4]]  # decoding
    prepared = [predictor.prepare(image) for image in images]  # pre-processing: uint8 still
    assert all(p.dtype == torch.uint8 for p in prepared)
    rows = predictor.predict(prepared)  # the model
    assert [r['top_probs'] for r in rows] == [r['top_probs'] for r in predictor(images)]
    with pytest.raises(TypeError, match='uint8'):
        predictor.prepare(images[0].float())
    with pytest.raises(ValueError, match='channels=3'):
        predictor.prepare(images[0][:1])


def test_amp_runs_the_model_in_bfloat16_close_to_float32(tiny_checkpoint, photos):
    _, made = photos
    images = [read_image(path) for path in made['good'][:4]]
    exact = tiny_predictor(tiny_checkpoint, features=True)(images)
    mixed = tiny_predictor(tiny_checkpoint, features=True, amp_dtype=torch.bfloat16)(images)
    for a, b in zip(exact, mixed):
        assert np.allclose(a['top_probs'], b['top_probs'], atol=0.02) and a['top_probs'] != b['top_probs']
        assert all(isinstance(v, float) for v in b['features'])  # stored as float32 whatever ran


def test_max_pixels_shrinks_only_larger_images(tiny_checkpoint):
    predictor = tiny_predictor(tiny_checkpoint, max_pixels=4000)
    big, small = torch.zeros(3, 100, 200, dtype=torch.uint8), torch.zeros(3, 40, 50, dtype=torch.uint8)
    assert predictor.prepare(big).shape == (3, 44, 89) and predictor.prepare(small).shape == (3, 40, 50)
    [row] = predictor([big])
    assert (row['width'], row['height'], row['input_width'], row['input_height']) == (200, 100, 89, 44)


def test_a_fixed_size_model_gets_each_image_resized_and_cropped(tiny_checkpoint, photos):
    _, made = photos
    predictor = tiny_predictor(tiny_checkpoint, own_size=False, selection=True)
    rows = predictor([read_image(path) for path in made['good'][:3]])
    assert {(r['input_width'], r['input_height'], r['grid_rows'], r['k']) for r in rows} == {(112, 112, 8, 6)}
    with pytest.raises(ValueError, match='--max-pixels caps images taken at their own size'):
        tiny_predictor(tiny_checkpoint, own_size=False, max_pixels=1000)


def test_a_fixed_k_refuses_an_image_with_fewer_patches_by_name(tiny_checkpoint):
    predictor = tiny_predictor(tiny_checkpoint, k=10)
    assert predictor.prepare(torch.zeros(3, 56, 56, dtype=torch.uint8)).shape == (3, 56, 56)  # 16 patches
    with pytest.raises(predict.ImageError, match='fewer than k=10: give a --k-ratio') as error:
        predictor.prepare(torch.zeros(3, 30, 30, dtype=torch.uint8))  # 3 x 3 patches
    assert error.value.kind == 'too small'


def test_any_timm_model_runs_resized_and_normalised(tmp_path):
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=1, num_classes=3).eval()
    checkpoint = tmp_path / 'vit.safetensors'
    save_file(vit.state_dict(), str(checkpoint))
    predictor = Predictor.from_name('vit_tiny_patch16_224', checkpoint=str(checkpoint),
                                    model_kwargs=dict(img_size=32, depth=1), features=True)
    image = torch.from_numpy(halves(48, 80)).permute(2, 0, 1).contiguous()
    [row] = predictor([image])
    assert (row['input_width'], row['input_height'], row['k']) == (32, 32, None)
    x = predictor.prepare(image)[None].float() / 255
    cfg = predictor.data_config
    x = (x - torch.tensor(cfg['mean']).view(1, 3, 1, 1)) / torch.tensor(cfg['std']).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = vit(x).softmax(-1)[0]
    assert np.allclose(sorted(row['top_probs']), sorted(expected.tolist()), atol=1e-5)
    with pytest.raises(ValueError, match='need a LookWhere model'):
        Predictor(vit, selection=True)


def test_the_shipped_segmenter_writes_a_mask_per_image(tmp_path):
    folder = tmp_path / 'scenes'
    folder.mkdir()
    scenes = [generate_dense_scene(0, 'test', i, img_size=160) for i in range(2)]
    for i, scene in enumerate(scenes):
        scene.image.crop((0, 0, 160 - 30 * i, 160)).save(folder / f'{i}.png')
    output = tmp_path / 'out'
    code = run_predict(folder, '--output', output, '--model', 'lookwhere_vitt16_512.dense_signs', '--workers', '0',
                       '--quiet')
    assert code == EXIT_OK
    rows = read_table(output / 'predictions').to_pylist()
    segmenter = predict.create_model('lookwhere_vitt16_512.dense_signs')
    with torch.no_grad():
        logits = segmenter([read_image(row['path']) for row in rows])
    for row, expected in zip(rows, logits):
        mask = np.asarray(Image.open(output / row['mask_file']))
        assert mask.shape == (row['input_height'], row['input_width'])
        agree = (torch.from_numpy(mask.astype(np.int64)) == expected.argmax(0)).float().mean()
        assert agree > 0.999  # pixels on a near-tie of two classes may go either way
        assert row['top_indices'] is None
    manifest = json.loads((output / 'manifest.json').read_text())
    assert manifest['model']['class_names'] == list(SEGMENTATION_CLASSES)


def test_a_local_dir_export_runs_at_own_size(tmp_path, tiny_checkpoint):
    from timm_lookwhere.export import export_for_hf
    model = predict.create_model(TINY_NAME, checkpoint=str(tiny_checkpoint), own_size=False,
                                 **dict(TINY, num_classes=NUM_CLASSES))
    export_for_hf(model, tmp_path / 'export')
    predictor = Predictor.from_name(f'local-dir:{tmp_path / "export"}', selection=True)
    image = torch.from_numpy(halves(48, 80)).permute(2, 0, 1).contiguous()
    [row] = predictor([image])
    assert predictor.own_size and (row['input_width'], row['grid_cols']) == (80, 6)  # 80 px padded to 6 patches
    [expected] = tiny_predictor(tiny_checkpoint, selection=True)([image])
    assert np.allclose(row['top_probs'], expected['top_probs'], atol=1e-6)


def test_class_names_of_the_shipped_sign_model_and_of_imagenet():
    signs = timm.create_model('lookwhere_vitt16_512.sparse_signs', pretrained=True)
    assert predict.class_names(signs) == list(CLASS_NAMES)
    imagenet = timm.create_model('vit_tiny_patch16_224', depth=1, img_size=32)  # 1000 classes
    names = predict.class_names(imagenet)
    assert len(names) == 1000 and 'goldfish' in names[1]
    assert predict.class_names(tiny_model(num_classes=NUM_CLASSES)) is None


def test_inputs_folders_recursive_text_files_and_image_files_each_once(tmp_path, photos):
    folder, made = photos
    listing = tmp_path / 'more.txt'
    listing.write_text(f'# listed again\n{made["good"][0]}\n\n{tmp_path / "gone.jpg"}\n{folder / "jpeg"}\n')
    files = list_image_files([str(folder), str(listing), str(made['good'][1])])
    assert files == sorted(files) and len(files) == len(set(files))
    assert set(map(os.path.normpath, map(str, made['good'] + made['bad']))) <= set(files)
    assert str(tmp_path / 'gone.jpg') in files and str(folder / 'jpeg') in files  # listed: reading them says why
    assert not [f for f in files if f.endswith('README.md')]
    assert list_image_files([str(folder)], exclude=str(folder / 'png')) == sorted(
        f for f in list_image_files([str(folder)]) if not f.startswith(str(folder / 'png')))
    with pytest.raises(ValueError, match='neither a folder, an image file'):
        list_image_files([str(folder / 'README.md')])
    with pytest.raises(ValueError, match='does not exist'):
        list_image_files([str(tmp_path / 'nowhere')])


# --------------------------------------------------------------------------------------------
# the command line: bad files, --strict, refusals, relaunch


def test_a_listed_folder_missing_file_and_oversized_image_are_recorded_and_the_run_goes_on(
        tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / 'photos'
    made = write_photos(folder, with_bad=False)
    (folder / 'album.jpg').mkdir()  # a folder named like an image
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(folder / 'huge.png')
    listing = tmp_path / 'list.txt'
    listing.write_text('\n'.join([str(folder / 'album.jpg'), str(folder / 'missing.jpg'), str(folder / 'huge.png'),
                                  str(made['good'][0])]))
    output = tmp_path / 'out'
    code = run_predict(listing, '--output', output, *tiny_args(tiny_checkpoint), '--pixel-limit', '50000',
                       '--workers', '0', '--quiet')
    assert code == EXIT_BAD_FILES
    errors = {Path(row['path']).name: row['kind'] for row in read_table(output / 'errors').to_pylist()}
    assert errors == {'album.jpg': 'folder', 'missing.jpg': 'missing', 'huge.png': 'too large'}
    assert read_table(output / 'predictions').num_rows == 1
    err = capsys.readouterr().err
    assert '3 files gave no image' in err and 'album.jpg: folder' in err


def test_strict_stops_at_the_first_bad_file(tmp_path, photos, tiny_checkpoint, capsys):
    folder, _ = photos
    output = tmp_path / 'out'
    code = run_predict(folder, '--output', output, *tiny_args(tiny_checkpoint), '--strict', '--workers', '0', '--quiet',
                       '--part-size', '4')
    assert code == EXIT_STRICT
    err = capsys.readouterr().err
    assert 'cut.jpg' in err and '--strict' in err and 'truncated' in err
    assert not (output / 'predictions' / 'part-00000.parquet').exists()  # cut.jpg is the first file
    assert run_predict(folder, '--output', output, *tiny_args(tiny_checkpoint), '--workers', '0', '--quiet',
                       '--part-size', '4') == EXIT_BAD_FILES  # without --strict it goes on and records it


@pytest.mark.slow
def test_a_second_launch_on_a_running_output_is_refused_naming_the_holder(tmp_path, photos, tiny_checkpoint, capsys):
    folder, _ = photos
    output = tmp_path / 'out'
    output.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', (
        'import sys, time; from timm_lookwhere.files import writer_lock\n'
        'with writer_lock(sys.argv[1]):\n    print("held", flush=True); time.sleep(60)'), str(output)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        code = run_predict(folder, '--output', output, *tiny_args(tiny_checkpoint), '--workers', '0', '--quiet')
    finally:
        holder.kill()
        holder.wait()
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith('lookwhere predict: error: ') and f'process {holder.pid}' in err and 'is in use' in err
    assert sorted(os.listdir(output)) == ['lock']  # nothing written


def test_a_relaunch_with_other_settings_is_refused_naming_old_and_new(finished, photos, tiny_checkpoint, capsys,
                                                                      tmp_path):
    output, _ = finished
    before = (output / 'manifest.json').read_text()
    folder, _ = photos
    code = run_predict(folder, '--output', output, *tiny_args(tiny_checkpoint), '--features', '--selection', '--dense',
                       '--top-k', '5', '--quiet')
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert 'other settings' in err and 'top_k=5 (the run has top_k=3)' in err and 'another --output' in err
    extra = tmp_path / 'more'
    write_photos(extra, with_bad=False)
    code = run_predict(folder, extra, '--output', output, *tiny_args(tiny_checkpoint), '--features', '--selection',
                       '--dense', '--top-k', '3', '--quiet')
    assert code == EXIT_USAGE and 'inputs:' in capsys.readouterr().err
    assert (output / 'manifest.json').read_text() == before


def test_a_relaunch_makes_only_the_missing_parts(tmp_path, photos, tiny_checkpoint):
    folder, _ = photos
    output = tmp_path / 'out'
    argv = [folder, '--output', output, *tiny_args(tiny_checkpoint), '--workers', '0', '--quiet', '--part-size', '3']
    assert run_predict(*argv) == EXIT_BAD_FILES
    parts = sorted((output / 'predictions').iterdir())
    whole = read_table(output / 'predictions')
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    os.remove(parts[2])
    (output / 'predictions' / 'part-00001.parquet.999.tmp').write_bytes(b'half a part')  # a killed writer's
    assert run_predict(*argv) == EXIT_BAD_FILES
    assert {p.name: p.stat().st_mtime_ns for p in sorted((output / 'predictions').iterdir())
            if p.name != parts[2].name} == {name: t for name, t in stamps.items() if name != parts[2].name}
    assert read_table(output / 'predictions').equals(whole)
    assert not list((output / 'predictions').glob('*.tmp'))
    manifest = json.loads((output / 'manifest.json').read_text())
    assert [launch['parts_missing'] for launch in manifest['launches']] == [len(parts), 1]


VIT = ['--model', 'vit_tiny_patch16_224', '--no-pretrained', '--model-kwargs', 'img_size=32', 'depth=1']


@pytest.mark.parametrize('extra, message', [
    (['--model', 'lookwhere_vitb_5188'], 'Unknown model'),
    (['--max-pixels', '100', '--no-own-size'], '--max-pixels caps images taken at their own size'),
    (['--checkpoint', 'nowhere.safetensors'], 'is not a file'),
    (['--amp', '--amp-dtype', 'float16', '--device', 'cpu'], 'float16 needs a CUDA device'),
    (['--k', '100000'], 'k=100000'),
    ([*VIT, '--selection'], 'need a LookWhere model'),
    ([*VIT, '--own-size'], 'images at their own size need a LookWhere'),
    ([*VIT, '--k', '4'], 'which sees them all'),
    (['--model', 'lookwhere_vitb_518', '--no-pretrained', '--model-kwargs', *TINY_KWARGS], 'no classifier head'),
])
def test_argument_errors_read_as_errors_with_exit_2(tmp_path, photos, tiny_checkpoint, capsys, extra, message):
    folder, _ = photos
    model = [] if '--model' in extra else tiny_args(tiny_checkpoint)
    code = run_predict(folder, '--output', tmp_path / 'out', *model, '--quiet', *extra)
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith('lookwhere predict: error: ') and message in err and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('case', ['no images', 'output is a file', 'output holds other things', 'not an input'])
def test_inputs_and_outputs_that_cannot_run_are_refused_before_writing(tmp_path, tiny_checkpoint, capsys, case):
    inputs, output = tmp_path / 'in', tmp_path / 'out'
    inputs.mkdir()
    (inputs / 'notes.txt.bak').write_text('x')
    if case != 'no images':
        Image.fromarray(halves()).save(inputs / 'a.png')
    if case == 'output is a file':
        output.write_text('x')
    elif case == 'output holds other things':
        output.mkdir()
        (output / 'holiday.jpg').write_bytes(b'')
    given = inputs / 'notes.txt.bak' if case == 'not an input' else inputs
    code = run_predict(given, '--output', output, *tiny_args(tiny_checkpoint), '--quiet')
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert {'no images': 'no image files in', 'output is a file': 'is a file',
            'output holds other things': 'holds other things than a lookwhere predict run (holiday.jpg)',
            'not an input': 'neither a folder'}[case] in err
    if case == 'output holds other things':
        assert os.listdir(output) == ['holiday.jpg']  # not even a lock file left in it
    elif case != 'output is a file':
        assert not output.exists()  # a refused start leaves no folder behind


def test_argparse_refuses_both_k_and_k_ratio_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['predict', 'x', '--output', 'o', '--model', 'm', '--k', '4', '--k-ratio', '0.1'])
    assert exit_info.value.code == 2 and 'not allowed with argument' in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_runs_as_lookwhere_predict_and_python_m(tmp_path, tiny_checkpoint):
    folder = tmp_path / 'photos'
    folder.mkdir()
    Image.fromarray(halves()).save(folder / 'a.png')
    result = subprocess.run([sys.executable, '-m', 'timm_lookwhere', 'predict', str(folder), '--output',
                             str(tmp_path / 'out'), *tiny_args(tiny_checkpoint), '--workers', '0'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_OK, result.stderr[-2000:]
    assert 'img/s' in result.stderr  # the progress bar: images/s and time left
    assert '1 images in' in result.stdout and '1 predictions of 1 files (1 part)' in result.stdout


# --------------------------------------------------------------------------------------------
# torchrun: two simulated nodes of two processes, killed, launched again with another count


KILLER = '''"""torchrun's entry in the kill test: lookwhere predict, this process SIGKILLing itself where KILL_* say."""
import os
import signal
import sys

import pyarrow.parquet as pq

from timm_lookwhere import predict

if int(os.environ['RANK']) == int(os.environ['KILL_RANK']):
    written, at = [0], int(os.environ['KILL_AT'])

    def die_after(step):
        def wrapped(*args, **kwargs):
            result = step(*args, **kwargs)
            if os.environ['KILL_MOMENT'] == 'mid-write' and 'predictions' not in str(args[1]):
                return result
            written[0] += 1
            if written[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapped
    if os.environ['KILL_MOMENT'] == 'mid-write':  # a part's file written under its temporary name, not yet renamed
        pq.write_table = die_after(pq.write_table)
    else:  # right after a whole part
        predict._write_part = die_after(predict._write_part)
sys.exit(predict.main(sys.argv[1:]))
'''


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(entry, argv, nodes, per_node, env):
    """Launch `nodes` torchrun agents on this machine, one c10d rendezvous; their processes (not yet waited on)."""
    port, run_id = free_port(), f'predict-{time.monotonic_ns()}'
    launches = []
    for node in range(nodes):
        rendezvous = ['--standalone'] if nodes == 1 else [
            '--nnodes', str(nodes), '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id',
            run_id, '--rdzv-conf', f'is_host={int(node == 0)}']
        command = [sys.executable, '-m', 'torch.distributed.run', *rendezvous, '--nproc_per_node', str(per_node),
                   *entry, *map(str, argv)]
        launches.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return launches


def wait_all(launches, timeout=240):
    outputs = [launch.communicate(timeout=timeout)[0] for launch in launches]
    return [launch.returncode for launch in launches], '\n'.join(outputs)


def part_stamps(output):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (output / 'predictions').iterdir()
            if p.suffix == '.parquet'}


@pytest.mark.slow  # three torchrun launches, 11 processes: about a minute on two cores
def test_torchrun_two_nodes_killed_and_launched_again_end_equal_to_an_uninterrupted_run(
        tmp_path, photos, tiny_checkpoint, restore_threads):
    folder, made = photos
    common = [folder, *tiny_args(tiny_checkpoint), '--features', '--selection', '--part-size', '1', '--workers', '0',
              '--threads', '1', '--quiet']
    whole = tmp_path / 'whole'
    assert run_predict(*common, '--output', whole) == EXIT_BAD_FILES  # uninterrupted, one process
    num_parts = json.loads((whole / 'manifest.json').read_text())['parts']['count']

    killed = tmp_path / 'killed'
    entry = tmp_path / 'killer.py'
    entry.write_text(KILLER)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(
        [str(Path(predict.__file__).parents[1]), os.environ.get('PYTHONPATH', '')]))
    if Path('/sys/class/net/lo').exists():
        env.setdefault('GLOO_SOCKET_IFNAME', 'lo')
    # 1. two nodes of two processes; rank 3 dies writing its first part (the file written, not renamed into place):
    # its 4 or 5 parts stay missing
    codes, log = wait_all(torchrun([str(entry)], [*common, '--output', killed], 2, 2,
                                   dict(env, KILL_RANK='3', KILL_MOMENT='mid-write', KILL_AT='1')))
    assert all(code != 0 for code in codes), log[-3000:]
    first = part_stamps(killed)
    assert 2 <= len(first) < num_parts, log[-3000:]
    assert list((killed / 'predictions').glob('*.tmp')), 'the kill came before the part was renamed into place'
    # 2. another process count: one node of three; rank 0, which holds the folder, dies after the first of its two
    # or more parts
    codes, log = wait_all(torchrun([str(entry)], [*common, '--output', killed], 1, 3,
                                   dict(env, KILL_RANK='0', KILL_MOMENT='after-part', KILL_AT='1')))
    assert codes[0] != 0, log[-3000:]
    second = part_stamps(killed)
    assert set(first) < set(second) and len(second) < num_parts, log[-3000:]
    assert {name: second[name] for name in first} == first  # what was done stays as it was
    # 3. the command itself, two nodes of two again: it makes only what is missing
    codes, log = wait_all(torchrun(['-m', 'timm_lookwhere', 'predict'], [*common, '--output', killed], 2, 2, env))
    assert codes == [0, 0], log[-3000:]  # bad files recorded: done, as torchrun must hear it (else: a failure)
    assert '3 files gave no image' in log
    third = part_stamps(killed)
    assert len(third) == num_parts and {name: third[name] for name in second} == second

    for sub in ('predictions', 'errors'):
        a, b = read_table(killed / sub), read_table(whole / sub)
        assert a.num_rows == b.num_rows and a.column_names == b.column_names
        for name in a.column_names:
            left, right = a[name].to_pylist(), b[name].to_pylist()
            if name in ('top_probs', 'features'):
                assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(left, right)), name
            elif name in ('selection', 'top_indices'):  # near-tied scores may swap places, not change the set
                assert [sorted(x) for x in left] == [sorted(y) for y in right], name
            else:
                assert left == right, name
    indices = [read_table(killed / sub)['index'].to_pylist() for sub in ('predictions', 'errors')]
    assert sorted(indices[0] + indices[1]) == list(range(len(made['good']) + len(made['bad'])))  # each file once
    assert not [name for _, _, names in os.walk(killed) for name in names if name.endswith('.tmp')]
    manifest = json.loads((killed / 'manifest.json').read_text())
    assert [(launch['status'], launch['processes']) for launch in manifest['launches']] == [
        ('interrupted', 4), ('interrupted', 3), ('finished', 4)]
    last = manifest['launches'][-1]
    assert sum(r['parts'] for r in last['by_rank']) == num_parts - len(second) and len(last['by_rank']) == 4
    assert manifest['status'] == 'complete' and manifest['counts']['predicted'] == len(made['good'])

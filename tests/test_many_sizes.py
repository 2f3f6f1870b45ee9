"""Many images of their own sizes in one call: a list of (C, H_i, W_i) tensors, timm's NaFlex batches, and the
native-size data pipeline; every output of image i equals a call on image i alone."""
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader

import timm
from timm.data import create_dataset, create_naflex_loader, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask

from conftest import TINY, assert_same_selection, tiny_model
from timm_lookwhere.native_size import CapPixels, collate_native, create_native_transform

PATCH = 14


def random_sizes(count, seed, low=40, high=430):
    """(H, W) of `count` images, random sides and aspect ratios, most of them not multiples of the patch."""
    rng = random.Random(seed)
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(count)]


def many_sizes_model(seed=0, **kwargs):
    return tiny_model(seed=seed, num_classes=5, dynamic_img_size=True, dynamic_img_pad=True, **kwargs)


def per_image(model, images, method):
    return [getattr(model, method)(image[None]) for image in images]


def by_patch_id(tokens, ids, num_prefix):
    """(P + k, D) tokens with the k patches' rows sorted by patch id."""
    return torch.cat([tokens[:num_prefix], tokens[num_prefix:][ids.argsort()]])


K_MODES = [dict(k=6), dict(k_ratio=0.15)]


@pytest.mark.parametrize('k_mode', K_MODES, ids=['fixed_k', 'k_ratio'])
@pytest.mark.parametrize('seed', [0, 1])
def test_every_output_of_an_image_in_a_list_equals_a_call_on_it_alone(k_mode, seed):
    model = many_sizes_model(seed=seed, global_pool='avg', **k_mode)
    torch.manual_seed(seed)
    images = [torch.randn(3, h, w) for h, w in random_sizes(5, seed)]
    with torch.no_grad():
        close = dict(rtol=0, atol=1e-5)
        torch.testing.assert_close(model(images), torch.cat(per_image(model, images, 'forward')), **close)

        selection, alone = model.forward_selection(images), per_image(model, images, 'forward_selection')
        for i, one in enumerate(alone):  # alone: each image's own selection, also for the tokens below
            assert_same_selection(selection['indices'][i], selection['map'][i], one['indices'][0], one['map'][0])
            torch.testing.assert_close(selection['map'][i], one['map'][0], **close)
            assert selection['grid_size'][i] == one['grid_size']

        for dense, one in zip(model.forward_dense(images), per_image(model, images, 'forward_dense')):
            torch.testing.assert_close(dense, one[0], **close)

        out, compared = model.forward_all(images), 0
        for i, one in enumerate(per_image(model, images, 'forward_features')):
            valid = one.shape[1]  # P + k_i
            assert not out['tokens'][i, valid:].any()  # padding zeroed
            ids, ids_alone = out['indices'][i], alone[i]['indices'][0]
            if set(ids.tolist()) == set(ids_alone.tolist()):  # else a near-tie traded places (checked above)
                # a patch's token sits where its id ranks; near-tied ids may swap ranks from one call to the next
                torch.testing.assert_close(by_patch_id(out['tokens'][i, :valid], ids, model.num_prefix_tokens),
                                           by_patch_id(one[0], ids_alone, model.num_prefix_tokens), **close)
                compared += 1
        assert compared >= len(images) - 1

        blocks, alone = model.forward_intermediates(images, indices=[0, 1]), per_image(
            model, images, 'forward_intermediates')
        for j in range(2):
            for i, one in enumerate(alone):
                torch.testing.assert_close(blocks[1][j][i], one[1][j][0], **close)


def test_fixed_k_list_is_one_batch_without_padding_and_k_ratio_pads_with_a_validity_mask():
    images = [torch.randn(3, h, w) for h, w in [(112, 112), (131, 157), (420, 266)]]
    with torch.no_grad():
        fixed = many_sizes_model(k=6).forward_all(images)
        assert fixed['patch_valid'] is None and fixed['tokens'].shape == (3, 5 + 6, TINY['embed_dim'])
        ratio = many_sizes_model(k_ratio=0.2).forward_all(images)
    counts = [int(0.2 * rows * cols) for rows, cols in ratio['grid_size']]
    assert ratio['grid_size'] == [(8, 8), (10, 12), (30, 19)]
    assert ratio['patch_valid'].sum(1).tolist() == counts == [len(ids) for ids in ratio['indices']]
    assert ratio['tokens'].shape == (3, 5 + max(counts), TINY['embed_dim'])


def test_with_k_ratio_the_extractor_runs_images_of_similar_k_together_not_padded_to_the_largest():
    """Cost follows k: one large image among small ones does not make each small one pay for its k."""
    model = many_sizes_model(k_ratio=0.2)
    sizes = [(56, 56), (420, 420), (56, 56), (56, 56), (406, 420)]  # k = 3, 180, 3, 3, 174
    runs = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: runs.append(tuple(args[0].shape[:2])))
    with torch.no_grad():
        out = model.forward_all([torch.randn(3, h, w) for h, w in sizes])
    assert sorted(runs) == [(2, 5 + 180), (3, 5 + 3)]  # the two groups, each padded to its own longest
    assert out['tokens'].shape[1] == 5 + 180 and out['patch_valid'].sum(1).tolist() == [3, 180, 3, 3, 174]


def test_a_list_of_images_of_the_models_size_gives_the_tensor_batchs_results():
    model = tiny_model(num_classes=5)  # a fixed-size model takes a list of images of its own size
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model(list(x)), model(x), rtol=0, atol=1e-5)
        listed, batched = model.forward_selection(list(x)), model.forward_selection(x)
        assert_same_selection(torch.stack(listed['indices']), torch.stack(listed['map']), batched['indices'],
                              batched['map'])


def test_features_only_backbone_gives_a_map_per_image_and_block():
    backbone = timm.create_model('lookwhere_vitb_518', features_only=True, out_indices=(0, 1), dynamic_img_size=True,
                                 dynamic_img_pad=True, **TINY).eval()
    images = [torch.randn(3, 70, 300), torch.randn(3, 112, 112)]
    with torch.no_grad():
        maps = backbone(images)
    assert len(maps) == 2 and [tuple(m.shape) for m in maps[1]] == [(32, 5, 22), (32, 8, 8)]


def test_a_hook_on_the_top_k_sees_each_image_of_a_list_on_its_own_grid():
    model = many_sizes_model(k_ratio=0.25)
    seen = []
    model.topk.register_forward_hook(lambda module, args, ids: seen.append((args[0].shape, ids.shape)))
    with torch.no_grad():
        model([torch.randn(3, 56, 56), torch.randn(3, 112, 84)])
    assert seen == [(torch.Size([1, 16]), torch.Size([1, 4])), (torch.Size([1, 48]), torch.Size([1, 12]))]


@pytest.mark.parametrize('images, error, match', [
    ([], ValueError, 'non-empty list'),
    ([torch.randn(1, 3, 56, 56)], ValueError, r'image 0 of the list: expected a \(C, H, W\) tensor'),
    ([torch.randn(3, 112, 112), 'photo.jpg'], ValueError, 'image 1 of the list: expected a .* got str'),
    ([torch.randint(0, 255, (3, 112, 112), dtype=torch.int16)], TypeError, 'image 0 of the list: expected uint8'),
])
def test_a_bad_list_names_the_image_and_the_problem(images, error, match):
    with pytest.raises(error, match=match):
        many_sizes_model()(images)


def test_other_sizes_in_a_list_need_a_dynamic_model():
    with pytest.raises(ValueError, match='built for 112x112 images, got 56x56.*dynamic_img_size=True'):
        tiny_model()([torch.randn(3, 112, 112), torch.randn(3, 56, 56)])
    with pytest.raises(ValueError, match='multiples of the patch size 14.*dynamic_img_pad=True'):
        tiny_model(dynamic_img_size=True)([torch.randn(3, 100, 112)])


# --------------------------------------------------------------------------------------------
# timm's NaFlex path, as train.py and validate.py run it with --naflex-loader


@pytest.fixture(scope='module')
def mixed_size_folder(tmp_path_factory):
    """train/ and validation/ ImageFolder splits of PNGs of many sizes and aspect ratios; each class lifts one
    colour channel."""
    root = tmp_path_factory.mktemp('mixed')
    rng = np.random.default_rng(0)
    sizes = iter(random_sizes(18, seed=3, low=50, high=260))
    for split, per_class in (('train', 4), ('validation', 2)):
        for channel, name in enumerate(('red', 'green', 'blue')):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                h, w = next(sizes)
                pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                pixels[..., channel] += 150
                Image.fromarray(pixels).save(root / split / name / f'{i}.png')
    return root


def naflex_loader(root, split, model, is_training, **kwargs):
    """create_naflex_loader as train.py / validate.py call it on the CPU (no prefetcher, no workers)."""
    config = resolve_data_config(model=model)
    dataset = create_dataset('', root=str(root), split=split, is_training=is_training)
    return create_naflex_loader(
        dataset, patch_size=model.get_patch_size(), mean=config['mean'], std=config['std'], is_training=is_training,
        use_prefetcher=False, pin_memory=False, num_workers=0, device=torch.device('cpu'), **kwargs)


def test_a_naflex_batch_gives_the_results_of_the_images_it_holds(mixed_size_folder):
    model = many_sizes_model(k_ratio=0.2)
    assert model.embeds.patch_size == (PATCH, PATCH)  # what validate.py reads
    loader = naflex_loader(mixed_size_folder, 'validation', model, is_training=False, batch_size=4, max_seq_len=256)
    batch, _ = next(iter(loader))
    assert batch['patch_valid'].shape[0] == 4 and not batch['patch_valid'].all()  # images of many sizes, padded
    with torch.no_grad():
        out = model.forward_all(batch)
        for b, grid in enumerate(out['grid_size']):
            valid = batch['patch_valid'][b]
            assert grid[0] * grid[1] == int(valid.sum())  # top-k over this image's valid patches only
            rows, cols = batch['patch_coord'][b][valid].T
            image = torch.zeros(3, grid[0] * PATCH, grid[1] * PATCH)
            for (r, c, patch) in zip(rows.tolist(), cols.tolist(), batch['patches'][b][valid]):
                pixels = patch.view(PATCH, PATCH, 3).permute(2, 0, 1)  # (p, p, C) as the loader lays them out
                image[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = pixels
            alone = model.forward_all(image[None])
            assert_same_selection(out['indices'][b], out['map'][b], alone['indices'][0], alone['map'][0])
            if torch.equal(out['indices'][b], alone['indices'][0]):  # (not where a near-tie traded places)
                torch.testing.assert_close(model(batch)[b], model(image[None])[0], rtol=0, atol=1e-5)


def test_naflex_patches_in_channels_first_layout_give_the_same_results(mixed_size_folder):
    last = many_sizes_model(k=4)
    first = many_sizes_model(k=4, patchify_channels_last=False)
    batch, _ = next(iter(naflex_loader(mixed_size_folder, 'validation', last, False, batch_size=3, max_seq_len=128)))
    b, n = batch['patches'].shape[:2]
    channels_first = batch['patches'].view(b, n, PATCH, PATCH, 3).permute(0, 1, 4, 2, 3).reshape(b, n, -1)
    first_layout = dict(batch, patches=channels_first)
    with torch.no_grad():
        torch.testing.assert_close(first(first_layout), last(batch), rtol=0, atol=1e-6)


def test_a_naflex_batch_of_another_patch_size_or_on_a_fixed_size_model_is_refused(mixed_size_folder):
    model = many_sizes_model()
    loader = naflex_loader(mixed_size_folder, 'validation', model, False, batch_size=2, max_seq_len=64)
    batch, _ = next(iter(loader))
    with pytest.raises(ValueError, match='create the model with dynamic_img_size=True'):
        tiny_model()(batch)
    sixteen = dict(batch, patches=torch.zeros(*batch['patches'].shape[:2], 16 * 16 * 3))
    with pytest.raises(ValueError, match=r"this model's patch size \(get_patch_size\(\)\)"):
        model(sixteen)
    with pytest.raises(ValueError, match=r"lacks \['patch_valid'\]"):
        model({k: v for k, v in batch.items() if k != 'patch_valid'})


def test_train_py_naflex_loop_trains_the_model_on_images_of_many_sizes(mixed_size_folder):
    """train.py --naflex-loader --model-kwargs dynamic_img_size=True: the training loader's batches of varying
    sequence length through timm's ClassificationTask, then validation as validate.py runs it."""
    torch.manual_seed(0)
    model = many_sizes_model(k_ratio=0.25)
    model.reset_classifier(3)
    loader = naflex_loader(mixed_size_folder, 'train', model, is_training=True, batch_size=4,
                           train_seq_lens=(64, 128), no_aug=True, hflip=0.)
    task = ClassificationTask(model, nn.CrossEntropyLoss())
    optimizer = create_optimizer_v2(model, opt='adamw', lr=3e-3, weight_decay=0.)
    losses = []
    model.train()
    for _ in range(6):
        for batch, target in loader:
            loss = task(batch, target)['loss']
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    model.eval()
    with torch.no_grad():
        batch, target = next(iter(naflex_loader(mixed_size_folder, 'validation', model, False, batch_size=6,
                                                max_seq_len=256)))
        assert model(batch).shape == (6, 3)


# --------------------------------------------------------------------------------------------
# data at its own size: a torch DataLoader over a mixed-size folder feeds the model directly


def test_native_transform_keeps_each_size_and_caps_only_larger_images(mixed_size_folder):
    model = many_sizes_model()
    transform = create_native_transform(model)
    image = Image.new('RGB', (300, 200), (255, 0, 0))
    x = transform(image)
    assert x.shape == (3, 200, 300)
    torch.testing.assert_close(x[0, 0, 0], torch.tensor((1 - 0.485) / 0.229))  # ImageNet mean/std
    capped = create_native_transform(model, max_pixels=60_000)
    assert capped(image).shape == (3, 200, 300)  # 60 000 pixels: kept
    assert capped(Image.new('RGB', (600, 400))).shape == (3, 200, 300)  # 240 000: halved, aspect kept
    with pytest.raises(ValueError, match='max_pixels must be at least 1'):
        CapPixels(0)


def test_a_torch_dataloader_with_collate_native_fine_tunes_on_mixed_sizes(mixed_size_folder):
    torch.manual_seed(0)
    model = many_sizes_model(k_ratio=0.25)
    model.reset_classifier(3)
    dataset = create_dataset('', root=str(mixed_size_folder), split='train', transform=create_native_transform(model))
    loader = DataLoader(dataset, batch_size=4, shuffle=True, collate_fn=collate_native)
    images, labels = next(iter(loader))
    assert isinstance(images, list) and len({tuple(x.shape) for x in images}) > 1 and labels.shape == (4,)
    optimizer = create_optimizer_v2(model, opt='adamw', lr=3e-3, weight_decay=0.)
    model.train()
    losses = []
    for _ in range(6):
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    with pytest.raises(TypeError, match='create_native_transform'):
        collate_native([(Image.new('RGB', (8, 8)), 0)])


def naflex_batch(images, patch=PATCH):
    """timm's NaFlex dict of (C, H, W) images on whole patches, as NaFlexCollator pads it: (p, p, C) patches."""
    seqs = [image.unfold(1, patch, patch).unfold(2, patch, patch).permute(1, 2, 3, 4, 0) for image in images]
    longest = max(s.shape[0] * s.shape[1] for s in seqs)
    patches = torch.zeros(len(images), longest, patch * patch * images[0].shape[0], dtype=images[0].dtype)
    coord = torch.zeros(len(images), longest, 2, dtype=torch.long)
    valid = torch.zeros(len(images), longest, dtype=torch.bool)
    for b, s in enumerate(seqs):
        rows, cols = s.shape[:2]
        patches[b, :rows * cols] = s.reshape(rows * cols, -1)
        coord[b, :rows * cols] = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing='ij'),
                                             -1).view(-1, 2)
        valid[b, :rows * cols] = True
    return dict(patches=patches, patch_coord=coord, patch_valid=valid)


@pytest.mark.parametrize('global_pool', ['avg', 'token'])
@pytest.mark.parametrize('form', ['tensor', 'list_fixed_k', 'list_k_ratio', 'naflex_k_ratio'])
def test_forward_head_of_forward_features_is_forward_for_every_input_form(form, global_pool):
    """What timm's wrappers call (transformers' TimmWrapper: forward_features, then forward_head) gives what forward
    gives, padding of many sizes left out of the average."""
    k_mode = dict(k=6) if form in ('tensor', 'list_fixed_k') else dict(k_ratio=0.2)
    model = many_sizes_model(global_pool=global_pool, **k_mode)
    torch.manual_seed(0)
    sized = [torch.randn(3, h, w) for h, w in [(112, 112), (56, 70), (420, 266)]]
    x = {'tensor': torch.randn(2, 3, 112, 112), 'list_fixed_k': sized, 'list_k_ratio': sized,
         'naflex_k_ratio': naflex_batch([torch.randn(3, h, w) for h, w in [(56, 70), (420, 266), (112, 112)]])}[form]
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), model(x), rtol=0, atol=1e-6)
        if form != 'tensor':  # NaFlexViT's form for many images: the padding said beside the tokens
            assert set(features) == {'patches', 'patch_valid'}
            final, _ = model.forward_intermediates(x, indices=1)
            torch.testing.assert_close(model.forward_head(final), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize('change, error, match', [
    (lambda b: b['patch_coord'].__setitem__((0, 0), torch.tensor([-1, 0])), ValueError, 'negative patch coordinates'),
    (lambda b: b['patch_coord'].__setitem__((0, 3), torch.tensor([0, 1000])), ValueError,
     r'image 0 of the NaFlex batch: its 20 valid patches do not tile its 4x1001 grid'),
    (lambda b: b['patch_coord'].__setitem__((1, 1), torch.tensor([0, 0])), ValueError,
     '1 cells missing, 1 given twice'),
    (lambda b: b.__setitem__('patches', b['patches'].double()), TypeError,
     r'NaFlex patches are torch.float64 but the model\'s weights are torch.float32'),
    (lambda b: b.__setitem__('patches', b['patches'].to(torch.int32)), TypeError,
     'NaFlex patches must be uint8 pixels or normalised floats, got torch.int32'),
    (lambda b: b.__setitem__('patch_coord', b['patch_coord'].float()), TypeError,
     'patch_coord must hold integer'),
])
def test_a_naflex_batch_whose_patches_do_not_tile_each_images_grid_once_is_refused(change, error, match):
    model = many_sizes_model(k=4)
    torch.manual_seed(0)
    batch = naflex_batch([torch.randn(3, 56, 70), torch.randn(3, 84, 84)])  # 4x5 and 6x6 grids
    change(batch)
    with pytest.raises(error, match=match):
        model(batch)


def test_an_empty_naflex_batch_or_list_is_named():
    model = many_sizes_model(k=4)
    empty = naflex_batch([torch.randn(3, 56, 56)])
    empty = {key: value[:0] for key, value in empty.items()}
    with pytest.raises(ValueError, match='the NaFlex batch holds no image'):
        model(empty)
    with pytest.raises(ValueError, match='give a non-empty list'):
        model([])


def test_forward_head_takes_a_features_dict_without_patch_valid_as_nothing_padded():
    # {'patches': ...} alone raised a KeyError
    model = many_sizes_model(global_pool='avg', k=6)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head({'patches': model.forward_features(x)}), model(x),
                                   rtol=0, atol=1e-6)

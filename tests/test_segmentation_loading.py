"""Shipped segmenters load through timm's machinery (a pretrained cfg, `build_model_with_cfg`, the filter function
of each part), and the dense teacher loads in one call: from the shipped file, from a written one, or from the file
a recipe run's teacher stage leaves."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

import timm
import timm_lookwhere
from timm_lookwhere.recipes import dense_signs
from timm_lookwhere.scenes import generate_dense_scene
from timm_lookwhere.segmentation import (
    SHIPPED_DENSE_TEACHERS, SHIPPED_SEGMENTERS, LookWhereSegmenter, ViTSegmenter, create_segmenter,
)

SEGMENTER = 'lookwhere_vitt16_512.dense_signs'


def fp16_file(model, path):
    """`model`'s state dict as the recipes ship one: fp16 safetensors."""
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))
    return load_file(str(path))


def scene_batch(side=512):
    from timm_lookwhere.scenes import generate_dense_scene
    import numpy as np
    pixels = torch.from_numpy(np.array(generate_dense_scene(2027, 'test', 0).image)).permute(2, 0, 1)[None]
    x = dense_signs.normalize(pixels)
    return x if side == 512 else F.interpolate(x, size=(side, side), mode='bilinear', antialias=True)


def by_hand(stored, **kwargs):
    """The shipped segmenter as it loaded before its pretrained cfg: the file's values copied into a float model,
    the position embedding resized by hand (bicubic, no antialias) where img_size asks for another grid."""
    model = LookWhereSegmenter(timm.create_model('lookwhere_vitt16_512', num_classes=0, **kwargs), 15, fill='selector')
    state = {k: v.float() for k, v in stored.items()}
    grid = model.backbone.grid_size
    if state['backbone.pos_embed'].shape[1] != grid[0] * grid[1]:
        state['backbone.pos_embed'] = resample_abs_pos_embed(
            state['backbone.pos_embed'], new_size=grid, num_prefix_tokens=0, antialias=False)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize('side', [512, 256])
def test_the_shipped_segmenter_loads_through_its_pretrained_cfg_with_its_logits_unchanged(side):
    stored = load_file(SHIPPED_SEGMENTERS[SEGMENTER][2])
    model = create_segmenter(SEGMENTER, pretrained=True, **({} if side == 512 else dict(img_size=side))).eval()
    cfg = model.pretrained_cfg
    assert (cfg['architecture'], cfg['tag'], cfg['file']) == ('lookwhere_vitt16_512', 'dense_signs',
                                                              SHIPPED_SEGMENTERS[SEGMENTER][2])
    assert model.backbone.grid_size == (side // 16, side // 16)
    x = scene_batch(side)
    with torch.no_grad():
        torch.testing.assert_close(model(x), by_hand(stored, img_size=side)(x), rtol=1e-5, atol=1e-5)


def test_a_segmenter_file_of_ones_own_loads_through_the_overlay_and_another_layout_is_named(tmp_path):
    torch.manual_seed(1)
    written = fp16_file(create_segmenter(SEGMENTER), tmp_path / 'mine.safetensors')
    model = create_segmenter(SEGMENTER, pretrained=True, img_size=256,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / 'mine.safetensors')))
    for key, value in model.state_dict().items():  # the file's values, the position embedding resized to 16x16
        if key != 'backbone.pos_embed':
            assert torch.equal(value, written[key].float()), key
    expected = resample_abs_pos_embed(written['backbone.pos_embed'].float(), (16, 16), num_prefix_tokens=0,
                                      antialias=False)
    torch.testing.assert_close(model.backbone.pos_embed, expected)
    # the dense teacher's file, given to the LookWhere segmenter by mistake
    fp16_file(timm_lookwhere.create_teacher(SEGMENTER, pretrained=False), tmp_path / 'teacher.safetensors')
    with pytest.raises(ValueError, match='checkpoint does not match LookWhere:\n  missing'):
        create_segmenter(SEGMENTER, pretrained=True,
                         pretrained_cfg_overlay=dict(file=str(tmp_path / 'teacher.safetensors')))
    with pytest.raises(FileNotFoundError, match='the weights of lookwhere_vitt16_512.dense_signs are missing'):
        create_segmenter(SEGMENTER, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'none.pt')))


# --------------------------------------------------------------------------------------------
# the dense teacher


def test_vit_segmenter_gives_pixel_logits_and_the_cells_of_windows_at_their_true_positions(images):
    torch.manual_seed(0)
    vit = timm.create_model('vit_small_patch14_reg4_dinov2', img_size=112, embed_dim=32, depth=2, num_heads=2,
                            reg_tokens=0, num_classes=7)
    model = ViTSegmenter(vit, 5).eval()
    x = images(2)
    with torch.no_grad():
        cells = model.forward_cells(x)
        assert cells.shape == (2, 5, 8, 8) and model(x).shape == (2, 5, 112, 112)
        # the whole image as one window at (0, 0) is the ViT's own view
        whole = model.forward_window(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
        torch.testing.assert_close(whole, cells, rtol=1e-5, atol=1e-5)
        low_res = ViTSegmenter(timm.create_model('vit_small_patch14_reg4_dinov2', img_size=56, embed_dim=32, depth=2,
                                                 num_heads=2, reg_tokens=0), 5, img_size=56).eval()
        assert low_res.forward_cells(x).shape == (2, 5, 4, 4) and low_res(x).shape == (2, 5, 112, 112)
    with pytest.raises(ValueError, match=r'a ViTSegmenter takes a \(B, C, H, W\) batch, got list'):
        model([x[0]])


@pytest.fixture
def written_teacher(tmp_path, monkeypatch):
    """A random dense teacher exported as the recipe ships one (fp16, keys vit.* and head.*), installed in place of
    the shipped file: the loading is tested apart from the shipped numbers."""
    torch.manual_seed(3)
    path = tmp_path / 'vit_teacher_vitt16_512_dense_signs.safetensors'
    written = fp16_file(timm_lookwhere.create_teacher(SEGMENTER, pretrained=False), path)
    monkeypatch.setattr(SHIPPED_DENSE_TEACHERS[SEGMENTER][1], 'file', str(path))
    return written


def test_create_teacher_of_a_segmenter_loads_its_dense_teacher_in_one_call(written_teacher):
    teacher = timm_lookwhere.create_teacher(SEGMENTER).eval()
    assert isinstance(teacher, ViTSegmenter) and teacher.num_classes == 15
    assert {k[:4] for k in written_teacher} == {'vit.', 'head'}
    assert all(torch.equal(v, written_teacher[k].float()) for k, v in teacher.state_dict().items())
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        logits = teacher(x)
        tokens = teacher.vit.forward_features(x)[:, teacher.vit.num_prefix_tokens:]  # (1, 32 * 32, 128)
        cells = teacher.head(tokens.transpose(1, 2).reshape(1, -1, 32, 32))
    assert logits.shape == (1, 15, 512, 512)
    torch.testing.assert_close(logits, F.interpolate(cells, size=(512, 512), mode='bilinear', align_corners=False))
    smaller = timm_lookwhere.create_teacher(SEGMENTER, img_size=256).eval()  # timm's ViT filter resizes the grid
    assert smaller.vit.pos_embed.shape == (1, 256, 128)
    with torch.no_grad():
        assert smaller(torch.randn(1, 3, 256, 256)).shape == (1, 15, 256, 256)


def test_the_teacher_a_recipe_run_leaves_loads_through_the_overlay(written_teacher, tmp_path):
    """The teacher stage of the full recipe writes teacher/model.pth (float, ViTSegmenter(teacher_vit(cfg), 15))."""
    torch.manual_seed(4)
    model = ViTSegmenter(dense_signs.teacher_vit(dense_signs.CONFIGS['full']), dense_signs.NUM_CLASSES)
    torch.save(model.state_dict(), tmp_path / 'model.pth')
    loaded = timm_lookwhere.create_teacher(SEGMENTER, pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.pth')))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_missing_teacher_file_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(SHIPPED_DENSE_TEACHERS[SEGMENTER][1], 'file', str(tmp_path / 'gone.safetensors'))
    with pytest.raises(FileNotFoundError, match=r'teacher/model\.pth: create_teacher\(\.\.\., pretrained_cfg_overlay'):
        timm_lookwhere.create_teacher(SEGMENTER)
    assert timm_lookwhere.create_teacher(SEGMENTER, pretrained=False).num_classes == 15  # at random: no file needed
    with pytest.raises(ValueError, match=r"full-res teacher: timm_lookwhere.create_teacher\('lookwhere_vitt16_512"):
        create_segmenter('vit_teacher_vitt16_512.dense_signs')


def test_the_shipped_dense_teacher_loads_offline_and_segments_a_512_px_scene():
    file = SHIPPED_DENSE_TEACHERS[SEGMENTER][1].file
    assert os.path.isfile(file), f'the dense teacher is not shipped: {file}'
    teacher = timm_lookwhere.create_teacher(SEGMENTER).eval()
    stored = load_file(file)
    assert all(torch.equal(v, stored[k].float()) for k, v in teacher.state_dict().items())
    with torch.no_grad():
        assert teacher(scene_batch()).shape == (1, 15, 512, 512)


def test_the_dense_teacher_refuses_another_class_count_with_its_weights_and_names_the_way_out():
    # timm loaded the ViT and left a 3-class head untrained, silently
    way_out = "ViTSegmenter(timm_lookwhere.create_teacher('lookwhere_vitt16_512.sparse_signs'), num_classes=3)"
    with pytest.raises(ValueError, match=r"segments the 15 classes it shipped with; for 3, .*" + re.escape(way_out)):
        timm_lookwhere.create_teacher(SEGMENTER, num_classes=3)
    assert timm_lookwhere.create_teacher(SEGMENTER, pretrained=False, num_classes=3).head.out_channels == 3
    assert timm_lookwhere.create_teacher(SEGMENTER, num_classes=15).head.out_channels == 15
    teacher = ViTSegmenter(timm_lookwhere.create_teacher('lookwhere_vitt16_512.sparse_signs'), num_classes=3).eval()
    with torch.no_grad():
        assert teacher(torch.zeros(1, 3, 512, 512)).shape == (1, 3, 512, 512)


def test_the_dense_teacher_refuses_an_img_size_off_its_patch_naming_the_nearest():
    # 250 px was taken, and the ViT's 15x15 grid never saw the last 10 pixels of each side
    with pytest.raises(ValueError, match=r'img_size=\(250, 250\) is not a multiple of the 16 px patch.*\[240, 256\]'):
        timm_lookwhere.create_teacher(SEGMENTER, img_size=250)
    with pytest.raises(ValueError, match=r'img_size=\(8, 40\) .*\[16, 32, 48\]'):
        timm_lookwhere.create_teacher(SEGMENTER, pretrained=False, img_size=(8, 40))


def test_the_dense_teacher_takes_uint8_pixels_as_the_floats_its_pretrained_cfg_normalises():
    # a uint8 batch met the float convolution (a dtype RuntimeError)
    teacher = timm_lookwhere.create_teacher(SEGMENTER).eval()
    pixels = torch.from_numpy(np.array(generate_dense_scene(2027, 'test', 0).image)).permute(2, 0, 1)[None]
    mean, std = (torch.tensor(teacher.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    with torch.no_grad():
        torch.testing.assert_close(teacher(pixels), teacher((pixels.float() / 255 - mean) / std), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match='expected uint8 pixels'):
        teacher(pixels.long())


def test_the_dense_teacher_names_the_size_it_takes_and_the_ways_to_another():
    # timm's bare AssertionError: "Input height (256) doesn't match model (512)."
    teacher = timm_lookwhere.create_teacher(SEGMENTER).eval()
    x = torch.randn(1, 3, 256, 256)
    with pytest.raises(ValueError, match=r'built for 512x512 images, got 256x256; create it with '
                                         r'img_size=\(256, 256\), or with dynamic_img_size=True'):
        teacher(x)
    with torch.no_grad():
        assert timm_lookwhere.create_teacher(SEGMENTER, img_size=256)(x).shape == (1, 15, 256, 256)
        assert timm_lookwhere.create_teacher(SEGMENTER, dynamic_img_size=True)(x).shape == (1, 15, 256, 256)

"""The registered models and their timm API: shapes, k, selection hooks, training, cost, bad input."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import timm
from timm.optim import create_optimizer_v2

from timm_lookwhere import LookWhere, SelectionRecorder

from conftest import TINY, tiny_model

MODEL_NAMES = ['lookwhere_vitb_518', 'lookwhere_vitb_224', 'lookwhere_vitb_franca_518', 'lookwhere_vits_518',
               'lookwhere_vitt16_256', 'lookwhere_vitt16_512']


def test_models_are_registered_with_their_pretrained_tags():
    assert set(timm.list_models('lookwhere*')) == set(MODEL_NAMES)
    assert set(timm.list_models('lookwhere*', pretrained=True)) == {
        'lookwhere_vitb_518.dinov2', 'lookwhere_vitb_224.dinov2', 'lookwhere_vitb_franca_518.franca',
        'lookwhere_vitt16_256.sparse_signs', 'lookwhere_vitt16_512.sparse_signs'}
    small = timm.get_pretrained_cfg('lookwhere_vitb_224.dinov2')  # the same file, another size
    assert small.input_size == (3, 224, 224) and small.hf_hub_filename == 'lookwhere_dinov2.pt'
    cfg = timm.get_pretrained_cfg('lookwhere_vitb_518.dinov2')
    assert cfg.input_size == (3, 518, 518) and cfg.crop_pct == 1.0 and cfg.interpolation == 'bicubic'
    assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
    assert (cfg.hf_hub_id, cfg.hf_hub_filename, cfg.license) == ('antofuller/lookwhere', 'lookwhere_dinov2.pt', 'mit')
    assert timm.get_pretrained_cfg('lookwhere_vitb_franca_518.franca').hf_hub_filename == 'lookwhere_franca.pt'


@pytest.mark.full_size
@pytest.mark.parametrize('name, width, prefix, selector_grid, selector_depth', [
    ('lookwhere_vitb_518', 768, 5, 11, 3),
    ('lookwhere_vitb_franca_518', 768, 1, 11, 3),
    ('lookwhere_vits_518', 384, 5, 7, 6),
])
def test_registered_model_builds_and_runs_at_batch_1_and_3(name, width, prefix, selector_grid, selector_depth, images):
    model = timm.create_model(name, num_classes=10).eval()
    assert model.grid_size == (37, 37) and model.k == 136 and model.num_prefix_tokens == prefix
    assert model.selector.grid_size == (selector_grid, selector_grid)
    assert len(model.selector.backbone.blocks) == selector_depth and len(model.blocks) == 12
    for batch in (1, 3):
        x = images(batch, 518)
        with torch.no_grad():
            out = model.forward_all(x)
            logits = model.forward_head(out['tokens'])
        assert logits.shape == (batch, 10)
        assert out['tokens'].shape == (batch, prefix + 136, width)
        assert out['map'].shape == (batch, 1369) and out['indices'].shape == (batch, 136)
        assert model.dense_from_tokens(out['tokens'], out['indices']).shape == (batch, width, 37, 37)


def test_an_image_gives_the_same_result_whatever_batch_it_is_in(images):
    model = tiny_model(num_classes=5)
    x = images(4, seed=3)
    with torch.no_grad():
        together = model.forward_dense(x), model(x), model.forward_selection(x)['indices']
        for i in range(4):
            alone = model.forward_dense(x[i:i + 1]), model(x[i:i + 1]), model.forward_selection(x[i:i + 1])['indices']
            shuffled = torch.cat([x[i:i + 1], x[:i], x[i + 1:]])
            with_others = model(shuffled)[0]
            assert torch.equal(alone[2][0], together[2][i])
            torch.testing.assert_close(alone[0][0], together[0][i], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone[1][0], together[1][i], atol=1e-5, rtol=0)
            torch.testing.assert_close(with_others, together[1][i], atol=1e-5, rtol=0)


def test_outputs_follow_timm_conventions(images):
    model = tiny_model(num_classes=7)
    x = images(2)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_prefix_tokens + model.k, 32)
        assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 0])
        torch.testing.assert_close(model(x), model.get_classifier()(feats[:, 0]))
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity) and model(x).shape == (2, 32)
        model.reset_classifier(3, global_pool='avg')
        assert model(x).shape == (2, 3)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True),
                                   feats[:, model.num_prefix_tokens:].mean(1))
    assert tiny_model(num_classes=0)(x).shape == (2, 32)


def test_timm_kwargs_reach_the_model():
    model = tiny_model(num_classes=4, global_pool='avg', in_chans=1, drop_rate=0.3, drop_path_rate=0.2)
    assert model.in_chans == 1 and model.global_pool == 'avg' and model.head_drop.p == 0.3
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model(torch.randn(2, 1, 112, 112)).shape == (2, 4)


def test_k_ratio_k_and_set_k(images):
    assert tiny_model().k == 6  # default k_ratio 0.1 of 64 patches
    assert tiny_model(k_ratio=0.25).k == 16
    model = tiny_model(k=10)
    assert model.k == 10 and model.forward_selection(images(1))['indices'].shape == (1, 10)
    model.set_k(k_ratio=0.5)
    assert model.k == 32 and model.forward_features(images(1)).shape[1] == model.num_prefix_tokens + 32
    model.set_k(k=64)
    assert model.forward_selection(images(1))['indices'].sort().values.tolist() == [list(range(64))]


def test_non_square_and_larger_images(images):
    model = tiny_model(img_size=(112, 196), k=12)
    assert model.grid_size == (8, 14) and model.num_patches == 112
    x = images(2, (112, 196))
    with torch.no_grad():
        assert model.forward_dense(x).shape == (2, 32, 8, 14)
        sel = model.forward_selection(x)
    assert sel['map'].shape == (2, 112) and int(sel['indices'].max()) < 112


def test_selection_is_the_top_k_of_the_map_best_first(images):
    model = tiny_model(k=9)
    sel = model.forward_selection(images(3))
    expected = sel['map'].topk(9, dim=1).indices
    assert torch.equal(sel['indices'], expected)
    scores = sel['map'].gather(1, sel['indices'])
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_forward_hook_reads_the_map_and_the_indices(images):
    model = tiny_model()
    seen = {}
    model.topk.register_forward_hook(lambda m, args, out: seen.update(map=args[0], indices=out))
    x = images(2)
    with torch.no_grad():
        model(x)
    sel = model.forward_selection(x)
    assert torch.equal(seen['indices'], sel['indices'])
    torch.testing.assert_close(seen['map'], sel['map'])


def test_forward_hook_can_replace_the_selection(images):
    model = tiny_model(k=8)
    fixed = torch.arange(8)
    handle = model.topk.register_forward_hook(lambda m, args, out: fixed.expand(len(args[0]), -1))
    x = images(2)
    with torch.no_grad():
        out = model.forward_all(x)
    assert torch.equal(out['indices'], fixed.expand(2, -1))
    handle.remove()
    # a random-selection ablation changes what the extractor sees
    gen = torch.Generator().manual_seed(0)
    model.topk.register_forward_hook(
        lambda m, args, out: torch.rand(args[0].shape, generator=gen).topk(m.k, dim=1).indices)
    with torch.no_grad():
        random_out = model.forward_all(x)
    assert not torch.equal(random_out['indices'], out['indices'])
    assert random_out['tokens'].shape == out['tokens'].shape


def test_hook_returning_a_wrong_selection_is_a_clear_error(images):
    model = tiny_model()
    model.topk.register_forward_hook(lambda m, args, out: out.float())
    with pytest.raises(ValueError, match='integer patch ids'):
        model(images(1))


def test_selection_recorder_keeps_every_forward(images):
    model = tiny_model()
    with SelectionRecorder(model) as rec:
        with torch.no_grad():
            model(images(2, seed=0))
            model(images(1, seed=1))
    model(images(1))  # after the block nothing more is recorded
    assert [r['indices'].shape for r in rec.records] == [(2, model.k), (1, model.k)]
    assert rec.records[0]['map'].shape == (2, 64)
    assert torch.equal(rec.records[1]['indices'], model.forward_selection(images(1, seed=1))['indices'])


def test_training_updates_extractor_and_head_but_not_the_frozen_selector(images):
    model = tiny_model(num_classes=3).train()
    assert not any(p.requires_grad for p in model.selector.parameters())
    assert not model.selector.training  # a frozen selector stays in eval mode
    names = {n for n, _ in model.named_parameters()}
    assert not {'cls_token', 'reg_token'} & names  # the extractor has no unused prefix tokens
    loss = model(images(2)).logsumexp(1).sum()
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP with find_unused_parameters=False will not complain
    assert all(p.grad is None for p in model.selector.parameters())


def test_unfrozen_selector_trains_through_its_prefix_tokens(images):
    model = tiny_model(num_classes=3, freeze_selector=False).train()
    assert model.selector.training
    model(images(2)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads['selector.backbone.cls_token'] is not None
    assert all(g is not None for g in grads.values())
    assert not model.selector.head.fc1.weight.requires_grad  # only a map loss can teach the map head
    model.set_selector_trainable(True, head=True)
    assert model.selector.head.fc1.weight.requires_grad


def test_frozen_selector_runs_without_autograd(images):
    model = tiny_model(num_classes=3).train()
    out = model.forward_all(images(1))
    assert not out['map'].requires_grad and out['tokens'].requires_grad


def test_layer_decay_weight_decay_and_grad_checkpointing(images):
    model = tiny_model(num_classes=3)
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    group_of = {id(p): g for g in opt.param_groups for p in g['params']}
    assert set(group_of) == {id(p) for p in model.parameters() if p.requires_grad}  # the frozen selector is out
    assert len({g['lr_scale'] for g in opt.param_groups}) == 4  # stem, 2 blocks, head/norm
    params = (model.pos_embed, model.blocks[0].attn.qkv.weight, model.head.weight)
    stem, block0, head = (group_of[id(p)] for p in params)
    assert stem['lr_scale'] < block0['lr_scale'] < head['lr_scale'] == 1.0
    assert stem['weight_decay'] == 0 and block0['weight_decay'] == 0.05

    x = images(2)
    model.train()
    torch.manual_seed(0)
    plain = model(x).sum()
    plain.backward()
    grad = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    ckpt = model(x).sum()
    ckpt.backward()
    torch.testing.assert_close(ckpt, plain)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad, grad)


def test_only_the_chosen_patches_are_embedded(images):
    model = tiny_model(k=5)
    calls = []
    model.patch_embed.proj.register_forward_hook(lambda *a: calls.append(1))
    with FlopCounterMode(display=False) as small:
        model(images(1, 112))
    big_model = tiny_model(k=5, img_size=224)
    big_model.patch_embed.proj.register_forward_hook(lambda *a: calls.append(1))
    with FlopCounterMode(display=False) as big:
        big_model(images(1, 224))
    assert calls == []  # the full-image conv never runs
    # at the same k, a 4x larger image costs no extra FLOPs: no step touches every high-res patch
    assert big.get_total_flops() == small.get_total_flops()


@pytest.mark.full_size
@pytest.mark.parametrize('name', ['lookwhere_vitb_224', 'lookwhere_vitt16_256'])
@pytest.mark.parametrize('freeze_selector', [True, False])
def test_backward_reaches_every_trainable_parameter_and_never_the_frozen_selector(name, freeze_selector):
    # timm's test_model_backward setting (num_classes=42, batch 2, train mode, the mean of the logits), which
    # asserts a gradient for every parameter; the frozen selector (the authors' fine-tuning) has none by design
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42, freeze_selector=freeze_selector).train()
    size = model.patch_embed.img_size
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 42)
    out.mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in model.named_parameters() if n in trainable and p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if n in trainable)
    selector = {n for n, _ in model.named_parameters() if n.startswith('selector.')}
    if freeze_selector:
        assert not selector & trainable
        assert all(p.grad is None for n, p in model.named_parameters() if n in selector)
    else:  # the selector's ViT trains through its prefix tokens; its map head only from a loss on the map
        assert {n for n in selector if n.startswith('selector.backbone.')} <= trainable
        assert not {n for n in selector if n.startswith('selector.head.')} & trainable


def test_reset_classifier_keeps_the_models_mode_device_and_dtype():
    for mode in (False, True):
        model = tiny_model(num_classes=3).train(mode).to(torch.float64)
        model.reset_classifier(5)
        assert model.head.training == mode and model.head.weight.dtype == torch.float64
        assert all(m.training == mode for m in model.modules() if not any(m is s for s in model.selector.modules()))


@pytest.mark.parametrize('k', [np.int64(7), np.int32(7), torch.tensor(7), 7])
def test_k_accepts_any_integral_number(k, images):
    model = tiny_model(k=k)
    assert model.k == 7 and type(model.k) is int
    model.set_k(k=k)
    assert model.forward_selection(images(1))['indices'].shape == (1, 7)


@pytest.mark.parametrize('k', [7.0, np.float64(7), torch.tensor(7.0), True, np.bool_(True), torch.tensor(True),
                               torch.tensor([7])])
def test_k_refuses_floats_bools_and_non_scalars(k):
    with pytest.raises(TypeError, match='k must be an int'):
        tiny_model(k=k)


def test_empty_batch_gives_empty_results_like_timms_vit():
    model = tiny_model(num_classes=4)
    x = torch.randn(0, 3, 112, 112)
    with torch.no_grad():
        assert model(x).shape == (0, 4)
        assert model.forward_features(x).shape == (0, model.num_prefix_tokens + model.k, 32)
        assert model.forward_dense(x).shape == (0, 32, 8, 8)
        sel = model.forward_selection(x)
        assert sel['map'].shape == (0, 64) and sel['indices'].shape == (0, model.k)
        final, maps = model.forward_intermediates(x)
        assert final.shape == (0, model.num_prefix_tokens + model.k, 32) and [m.shape for m in maps] == [
            (0, 32, 8, 8)] * 2
        assert model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)[0].shape == (0, 64, 32)


def test_selection_hook_with_ids_outside_the_grid_names_the_grid_and_the_ids(images):
    model = tiny_model()
    handle = model.topk.register_forward_hook(lambda m, args, out: torch.full_like(out, 64).index_fill(1, torch.tensor(
        [0]), -1))
    with pytest.raises(ValueError, match=r'outside \[0, 64\) for this 64-patch grid: \[-1, 64\]'):
        model(images(1))
    handle.remove()
    assert model(images(1)).shape == (1, 32)  # without the hook, the same model runs


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / 'not_there' / 'lookwhere_dinov2.pt'
    with pytest.raises(FileNotFoundError, match=str(missing)):
        timm.create_model('lookwhere_vitb_518', pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)), **TINY)


def fx_traced(model, return_nodes):
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    return create_feature_extractor(model, return_nodes=return_nodes, tracer_kwargs=tracer_kwargs)


def test_fx_trace_gives_the_models_outputs_and_keeps_its_checks_and_hooks(images):
    model = tiny_model(num_classes=3)
    traced = fx_traced(model, {'head': 'logits', 'topk': 'chosen', 'blocks.1': 'tokens'})
    x = images(2)
    with torch.no_grad():
        out = traced(x)
        torch.testing.assert_close(out['logits'], model(x), rtol=0, atol=1e-6)
        assert torch.equal(out['chosen'], model.forward_selection(x)['indices'])
        assert out['tokens'].shape == (2, model.num_prefix_tokens + model.k, 32)
        with pytest.raises(ValueError, match='expected 3 input channels, got 4'):  # the input check is in the graph
            traced(torch.randn(1, 4, 112, 112))
        fixed = torch.arange(model.k).expand(2, -1)
        traced.topk.register_forward_hook(lambda m, args, ids: fixed)  # top-k stays a module: hooks still work
        assert torch.equal(traced(x)['chosen'], fixed)


def test_fx_trace_scripts_and_timms_fx_feature_extraction_works(images):
    model = tiny_model(num_classes=3)
    x = images(2)
    scripted = torch.jit.script(fx_traced(model, {'head': 'logits'}))  # TorchScript through FX
    with torch.no_grad():
        torch.testing.assert_close(scripted(x)['logits'], model(x), rtol=0, atol=1e-5)
    features = timm.create_model('lookwhere_vitb_518', features_only=True, feature_cls='fx', out_indices=(0, 1),
                                 **TINY).eval()
    with torch.no_grad():
        assert [f.shape for f in features(x)] == [(2, model.num_prefix_tokens + model.k, 32)] * 2


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(img_size=100), ValueError, 'multiples of the patch size'),
    (dict(img_size=(112, 120)), ValueError, 'multiples of the patch size'),
    (dict(k=0), ValueError, 'between 1 and the 64 patches'),
    (dict(k=65), ValueError, 'between 1 and the 64 patches'),
    (dict(k=2.5), TypeError, 'k must be an int'),
    (dict(k_ratio=0.0), ValueError, r'k_ratio must be in \(0, 1\]'),
    (dict(k_ratio=1.5), ValueError, r'k_ratio must be in \(0, 1\]'),
    (dict(k_ratio='0.1'), TypeError, 'k_ratio must be a float'),
    (dict(k=4, k_ratio=0.1), ValueError, 'exactly one of k or k_ratio'),
    (dict(global_pool='max'), ValueError, 'global_pool'),
])
def test_bad_model_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny_model(**kwargs)


@pytest.mark.parametrize('shape, match', [
    ((1, 4, 112, 112), 'expected 3 input channels, got 4'),
    ((1, 3, 112, 100), 'multiples of the patch size 14, got 112x100'),
    ((1, 3, 224, 224), 'built for 112x112 images, got 224x224'),
    ((3, 112, 112), r'expected an image batch \(B, C, H, W\)'),
])
def test_bad_input_is_a_clear_error(shape, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))
    with pytest.raises(ValueError, match=match):
        model.forward_selection(torch.randn(*shape))


def test_set_k_rejects_bad_values():
    model = tiny_model()
    for kwargs, error in [(dict(), ValueError), (dict(k=-1), ValueError), (dict(k=True), TypeError),
                          (dict(k_ratio=-0.1), ValueError)]:
        with pytest.raises(error):
            model.set_k(**kwargs)
    assert model.k == 6  # unchanged after the failed calls


def test_model_is_a_lookwhere_with_the_selector_at_its_own_resolution():
    model = tiny_model(img_size=(224, 336))
    assert isinstance(model, LookWhere)
    assert model.selector.img_size == (42, 42) and model.selector.multiplier == 3
    assert model.pos_embed.shape == (1, 16 * 24, TINY['embed_dim'])


@pytest.mark.parametrize('size, nearest', [(50, '42 or 56'), (41, '28 or 42'), (10, 'use 14'), (0, 'use 14')])
def test_a_selector_copy_off_the_patch_grid_is_refused_with_the_nearest_sizes(size, nearest):
    with pytest.raises(ValueError, match=f'selector_img_size={size} must be a positive multiple of the patch size 14.*'
                                         f'{nearest}'):
        tiny_model(selector_img_size=size)


def test_integer_pixels_other_than_uint8_and_a_dtype_other_than_the_weights_are_clear_errors(images):
    model = tiny_model()
    pixels = torch.randint(0, 256, (1, 3, 112, 112), dtype=torch.int16)
    with pytest.raises(TypeError, match=r'expected uint8 pixels \(0\.\.255\) or a float image batch normalised .*'
                                        r'got torch\.int16; convert'):
        model(pixels)
    with pytest.raises(TypeError, match=r'the batch is torch\.float64 but the model\'s weights are torch\.float32'):
        model.forward_dense(images(1).double())
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):  # autocast casts per op: allowed
        assert model(images(1).bfloat16()).shape == (1, TINY['embed_dim'])
    with torch.no_grad():
        assert model.double()(images(1).double()).dtype == torch.float64


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_classes=-1), 'num_classes must be 0 or more, got -1'),
    (dict(depth=0), 'depth must be at least 1, got 0'),
    (dict(selector_depth=0), 'selector_depth must be at least 1'),
    (dict(num_heads=3), 'embed_dim=32 must be divisible by num_heads=3'),
    (dict(num_heads=0), 'num_heads must be at least 1'),
    (dict(num_neighbors=0), 'num_neighbors must be at least 1'),
    (dict(map_grid=0), 'map_grid must be at least 1'),
    (dict(patch_size=0), 'patch_size must be at least 1'),
    (dict(in_chans=0), 'in_chans must be at least 1'),
    (dict(embed_dim=-32), 'embed_dim must be at least 1'),
    (dict(reg_tokens=-1), 'reg_tokens must be 0 or more'),
    (dict(drop_path_rate=1.5), r'drop_path_rate is a probability, in \[0, 1\]'),
    (dict(attn_drop_rate=-0.1), r'attn_drop_rate is a probability'),
    (dict(mlp_ratio=0), 'mlp_ratio must be positive'),
])
def test_construction_arguments_out_of_range_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(**kwargs)

"""Moving code between modules changes no output: logits, selections and dense maps of the shipped models
and of a seeded random model, at a fixed size and at odd dynamic sizes, against values recorded before the
move (tests/data/recorded_outputs.pt, written by `python tests/test_outputs_unchanged.py --record`)."""
import sys
from pathlib import Path

import pytest
import torch

import timm
import timm_lookwhere  # noqa: F401  (registers the models)
from timm_lookwhere.scenes import generate_scene

from conftest import assert_same_selection, tiny_model

RECORDED = Path(__file__).parent / 'data' / 'recorded_outputs.pt'


def _scene_batch(img_size, seeds):
    """Normalised generated test scenes, (len(seeds), 3, img_size, img_size)."""
    from timm_lookwhere.demo import to_input
    model = timm.create_model('lookwhere_vitt16_256')  # only its data config (ImageNet mean/std) is read
    return torch.cat([to_input(model, generate_scene(seed, 'test', 0, img_size=img_size).image) for seed in seeds])


def cases():
    """name -> (model, input batch); each model in eval mode with a fixed selection budget."""
    torch.manual_seed(0)
    tiny_dynamic = tiny_model(seed=3, num_classes=5, dynamic_img_size=True, dynamic_img_pad=True, k_ratio=0.2)
    return {
        'lookwhere_vitt16_256.sparse_signs': (
            timm.create_model('lookwhere_vitt16_256.sparse_signs', pretrained=True, k_ratio=0.05).eval(),
            _scene_batch(256, [11, 12])),
        'lookwhere_vitt16_512.sparse_signs': (
            timm.create_model('lookwhere_vitt16_512.sparse_signs', pretrained=True, k_ratio=0.05).eval(),
            _scene_batch(512, [21, 22])),
        'tiny_random': (tiny_model(seed=1, num_classes=5), torch.randn(2, 3, 112, 112)),
        'tiny_random_dynamic_odd_size': (tiny_dynamic, torch.randn(2, 3, 131, 157)),
        'tiny_random_dynamic_large': (tiny_dynamic, torch.randn(1, 3, 420, 266)),
    }


def outputs(model, x, indices=None):
    """The recorded quantities; with `indices`, the extractor and the fill run on that selection instead of the
    model's own (a forward hook on the top-k replaces it)."""
    handle = None if indices is None else model.topk.register_forward_hook(lambda module, args, out: indices)
    try:
        with torch.no_grad():
            out = model.forward_all(x)
            return dict(
                logits=model.forward_head(out['tokens']),
                indices=out['indices'],
                map=out['map'],
                # one image's map, copied out of the batch's storage: it keeps the recorded file small
                dense=model.dense_from_tokens(out['tokens'], out['indices'], out['grid_size'])[:1].clone(),
            )
    finally:
        if handle is not None:
            handle.remove()


def record():
    RECORDED.parent.mkdir(exist_ok=True)
    torch.save({name: outputs(model, x) for name, (model, x) in cases().items()}, RECORDED)
    print(f'wrote {RECORDED}')


# Another CPU sums in another order (AVX-512 against AVX2, other thread counts): values move by a few 1e-6 and
# patches whose scores are that close may trade places (`conftest.assert_same_selection`, `NEAR_TIE`). A code move
# keeps values within this, and the chosen set of patches but for such near-ties.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def recorded():
    return torch.load(RECORDED, weights_only=True)


@pytest.mark.parametrize('name', list(cases()))
def test_outputs_equal_the_values_recorded_before_the_code_moved(name, recorded):
    model, x = cases()[name]
    before = recorded[name]
    now = outputs(model, x)
    torch.testing.assert_close(now['map'], before['map'], **TOLERANCE, msg=lambda m: f'{name}: map\n{m}')
    assert_same_selection(now['indices'], now['map'], before['indices'], before['map'], name)
    on_recorded_selection = outputs(model, x, indices=before['indices'])  # the extractor and the fill alone
    for key in ('logits', 'dense'):
        torch.testing.assert_close(on_recorded_selection[key], before[key], **TOLERANCE,
                                   msg=lambda m, key=key: f'{name}: {key}\n{m}')


def test_the_comparison_holds_against_recorded_values_perturbed_as_another_cpu_would(recorded):
    """What another CPU gives (values off by a few 1e-6, near-tied patches traded) passes; a real change fails."""
    name = 'tiny_random'
    model, x = cases()[name]
    before = {key: value.clone() for key, value in recorded[name].items()}
    generator = torch.Generator().manual_seed(0)
    perturbed = {key: value + 4e-6 * (2 * torch.rand(value.shape, generator=generator) - 1)
                 for key, value in before.items() if value.is_floating_point()}
    now = outputs(model, x, indices=before['indices'])
    for key in ('logits', 'dense', 'map'):
        torch.testing.assert_close(now[key], perturbed[key], **TOLERANCE)
    # the k-th and the (k+1)-th best of image 0 a near-tie apart, traded: still the same selection
    ranked = before['map'][0].argsort(descending=True)
    k = before['indices'].shape[1]
    tied_map = before['map'].clone()
    tied_map[0, ranked[k]] = tied_map[0, ranked[k - 1]] - 1e-6
    traded = before['indices'].clone()
    traded[0, -1] = ranked[k]
    assert_same_selection(traded, tied_map, before['indices'], tied_map, name)
    far = before['indices'].clone()
    far[0, -1] = ranked[-1]  # the worst-scored patch instead: a real change
    with pytest.raises(AssertionError, match='not near-ties'):
        assert_same_selection(far, before['map'], before['indices'], before['map'], name)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(now['logits'] + 1e-3, before['logits'], **TOLERANCE)


if __name__ == '__main__' and '--record' in sys.argv:
    record()

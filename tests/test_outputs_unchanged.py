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

from conftest import tiny_model

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


def outputs(model, x):
    with torch.no_grad():
        out = model.forward_all(x)
        return dict(
            logits=model.forward_head(out['tokens']),
            indices=out['indices'],
            map=out['map'],
            # one image's map, copied out of the batch's storage: it keeps the recorded file small
            dense=model.dense_from_tokens(out['tokens'], out['indices'], out['grid_size'])[:1].clone(),
        )


def record():
    RECORDED.parent.mkdir(exist_ok=True)
    torch.save({name: outputs(model, x) for name, (model, x) in cases().items()}, RECORDED)
    print(f'wrote {RECORDED}')


@pytest.fixture(scope='module')
def recorded():
    return torch.load(RECORDED, weights_only=True)


@pytest.mark.parametrize('name', list(cases()))
def test_outputs_equal_the_values_recorded_before_the_code_moved(name, recorded):
    model, x = cases()[name]
    now, before = outputs(model, x), recorded[name]
    assert torch.equal(now['indices'], before['indices'])  # the same patches, in the same order
    for key in ('logits', 'map', 'dense'):
        torch.testing.assert_close(now[key], before[key], rtol=0, atol=1e-6, msg=f'{name}: {key}')


if __name__ == '__main__' and '--record' in sys.argv:
    record()

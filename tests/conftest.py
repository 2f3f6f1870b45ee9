"""Shared test fixtures: tiny LookWhere configurations and checkpoints in the authors' layout."""
import os

import pytest
import torch

import timm
import timm_lookwhere  # noqa: F401  (registers the models)

# A LookWhere small enough for fast CPU tests: 8x8 high-res grid, 3x3 selector grid.
TINY = dict(img_size=112, embed_dim=32, depth=2, num_heads=2, selector_img_size=42, selector_depth=1, map_grid=8)


def tiny_model(name='lookwhere_vitb_518', **kwargs):
    torch.manual_seed(kwargs.pop('seed', 0))
    model = timm.create_model(name, **dict(TINY, **kwargs))
    randomize_(model)
    return model.eval()


def randomize_(module, scale=0.2):
    """Make every parameter matter: timm inits layer-scale at 1e-5, which hides the blocks."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if 'norm' in name and name.endswith('weight'):
                p.copy_(1 + scale * torch.randn_like(p))
            elif name.endswith('gamma'):
                p.copy_(0.5 + scale * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return module


def authors_layout(model):
    """The authors' nested checkpoint of a model built by this package."""
    sd = model.state_dict()
    backbone = {k[len('selector.backbone.'):]: v.clone() for k, v in sd.items() if k.startswith('selector.backbone.')}
    head = {k[len('selector.head.'):].replace('fc1', 'w1').replace('fc2', 'w2'): v.clone()
            for k, v in sd.items() if k.startswith('selector.head.')}
    extractor = {k: v.clone() for k, v in sd.items() if not k.startswith(('selector.', 'head.'))}
    # the authors' extractor is a full timm ViT and carries its own (unused) prefix tokens
    extractor['cls_token'] = torch.randn(1, 1, model.embed_dim)
    if model.num_reg_tokens:
        extractor['reg_token'] = torch.randn(1, model.num_reg_tokens, model.embed_dim)
    return {'selector': {'backbone': backbone, 'head': head}, 'extractor': extractor}


@pytest.fixture
def images():
    def make(batch=2, size=TINY['img_size'], seed=0, chans=3):
        g = torch.Generator().manual_seed(seed)
        size = (size, size) if isinstance(size, int) else size
        return torch.randn(batch, chans, *size, generator=g)
    return make


def write_hub_snapshot(cache, repo_id, folder, revision='b' * 40):
    """Every file of `folder` in a Hugging Face cache under `cache`, laid out as the Hub client leaves it
    (models--ORG--NAME/blobs by hash, snapshots/REV/ symlinks, refs/main)."""
    import hashlib
    import os
    from pathlib import Path
    repo_dir = Path(cache) / f'models--{repo_id.replace("/", "--")}'
    snapshot = repo_dir / 'snapshots' / revision
    snapshot.mkdir(parents=True)
    (repo_dir / 'blobs').mkdir(exist_ok=True)
    for file in sorted(Path(folder).iterdir()):
        payload = file.read_bytes()
        blob = repo_dir / 'blobs' / hashlib.sha256(payload).hexdigest()
        blob.write_bytes(payload)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / 'refs').mkdir(exist_ok=True)
    (repo_dir / 'refs' / 'main').write_text(revision)
    return snapshot


@pytest.fixture
def restore_threads(monkeypatch):
    """A recipe's main() sets torch's threads and OMP_NUM_THREADS for its run; the tests after it keep theirs."""
    monkeypatch.setenv('OMP_NUM_THREADS', os.environ.get('OMP_NUM_THREADS', str(torch.get_num_threads())))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# Another CPU sums in another order (AVX-512 against AVX2, other thread counts): scores move by a few 1e-6, and
# patches scored that close may trade places in a selection. Selections are compared allowing that, no more.
NEAR_TIE = 1e-4  # score gap to the k-th best within which a patch may enter or leave the chosen set


def assert_same_selection(now_indices, now_map, before_indices, before_map, name='', near_tie=NEAR_TIE):
    """The chosen set equals the expected one but for patches scored within `near_tie` of the k-th best, and the
    ids come best first by their own map (the order the dense fill breaks ties by). (k,) ids and (N,) maps, or
    (B, k) and (B, N)."""
    if now_indices.dim() == 1:
        now_indices, now_map, before_indices, before_map = (t[None] for t in (now_indices, now_map, before_indices,
                                                                              before_map))
    assert now_indices.shape == before_indices.shape, f'{name}: k changed'
    for i, (now, before) in enumerate(zip(now_indices.tolist(), before_indices.tolist())):
        kth_best = before_map[i, before].min()
        traded = set(now) ^ set(before)
        far = [p for p in traded if abs(before_map[i, p] - kth_best) > near_tie]
        assert not far, f'{name}, image {i}: patches {far} entered or left the selection, not near-ties'
        scores = now_map[i, now_indices[i]]
        assert bool((scores[:-1] >= scores[1:]).all()), f'{name}, image {i}: ids not best first'


def pytest_collection_modifyitems(items):
    """Full-size models take seconds each: they are left out of the quick loop (-m "not slow") too."""
    for item in items:
        if item.get_closest_marker('full_size'):
            item.add_marker(pytest.mark.slow)

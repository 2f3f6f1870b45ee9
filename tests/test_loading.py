"""Pretrained weights: the authors' file, this project's flat files, the Hub cache, and what goes wrong."""
import hashlib
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import timm

from conftest import TINY, authors_layout, tiny_model

HUB_REVISION = 'a' * 40


def load(path, **kwargs):
    return timm.create_model('lookwhere_vitb_518', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **dict(TINY, **kwargs)).eval()


def same_outputs(a, b, x):
    with torch.no_grad():
        out_a, out_b = a.forward_all(x), b.forward_all(x)
    return torch.equal(out_a['indices'], out_b['indices']) and torch.allclose(out_a['tokens'], out_b['tokens'])


def test_authors_file_loads_into_the_model_it_came_from(tmp_path, images):
    source = tiny_model()
    torch.save(authors_layout(source), tmp_path / 'lookwhere_dinov2.pt')
    model = load(tmp_path / 'lookwhere_dinov2.pt')
    assert same_outputs(model, source, images(2))
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_flat_state_dict_loads_in_both_formats(tmp_path, images, suffix):
    source = tiny_model(num_classes=0)
    path = tmp_path / f'model{suffix}'
    if suffix == '.safetensors':
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    assert same_outputs(load(path), source, images(2))


def test_fine_tuned_classifier_loads_with_its_head(tmp_path, images):
    source = tiny_model(num_classes=5)
    torch.save({'state_dict': source.state_dict(), 'epoch': 3}, tmp_path / 'finetuned.pth')
    model = load(tmp_path / 'finetuned.pth', num_classes=5)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def test_authors_features_get_a_fresh_head_for_a_new_task(tmp_path, images):
    source = tiny_model()
    torch.save(authors_layout(source), tmp_path / 'lookwhere_dinov2.pt')
    model = load(tmp_path / 'lookwhere_dinov2.pt', num_classes=4)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), source(x))
    assert model(x).shape == (2, 4) and model.head.weight.std() > 0


def test_loading_at_another_resolution_resizes_position_embeddings_bicubically(tmp_path, images):
    source = tiny_model()
    torch.save(authors_layout(source), tmp_path / 'lookwhere_dinov2.pt')
    model = load(tmp_path / 'lookwhere_dinov2.pt', img_size=(168, 224))
    pos = source.pos_embed.reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(pos, size=(12, 16), mode='bicubic', align_corners=False)
    torch.testing.assert_close(model.pos_embed, expected.permute(0, 2, 3, 1).reshape(1, 12 * 16, -1))
    assert model.forward_dense(images(1, (168, 224))).shape == (1, 32, 12, 16)


def test_single_channel_model_adapts_both_patch_embeddings(tmp_path, images):
    source = tiny_model()
    torch.save(authors_layout(source), tmp_path / 'lookwhere_dinov2.pt')
    model = load(tmp_path / 'lookwhere_dinov2.pt', in_chans=1)
    for conv in (model.patch_embed.proj, model.selector.backbone.patch_embed.proj):
        assert conv.weight.shape[1] == 1
    torch.testing.assert_close(model.patch_embed.proj.weight[:, 0], source.patch_embed.proj.weight.sum(1))
    assert model(images(1, chans=1)).shape == (1, 32)


def test_checkpoint_of_another_layout_names_the_missing_and_unexpected_keys(tmp_path):
    sd = tiny_model().state_dict()
    del sd['blocks.1.attn.qkv.weight']
    sd['blocks.7.mlp.fc1.weight'] = torch.zeros(1)
    torch.save(sd, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match=r'missing 1 keys: blocks\.1\.attn\.qkv\.weight') as err:
        load(tmp_path / 'other.pth')
    assert 'unexpected 1 keys: blocks.7.mlp.fc1.weight' in str(err.value)


def test_authors_layout_with_a_part_missing_is_a_clear_error(tmp_path):
    ckpt = authors_layout(tiny_model())
    del ckpt['selector']['head']
    torch.save(ckpt, tmp_path / 'broken.pt')
    with pytest.raises(ValueError, match=r'lacks \["selector"\]\["head"\]'):
        load(tmp_path / 'broken.pt')


class _Exploit:
    def __reduce__(self):
        return os.system, ('touch ' + _Exploit.marker,)


def test_loading_never_executes_pickled_code(tmp_path):
    marker = tmp_path / 'pwned'
    _Exploit.marker = str(marker)
    sd = tiny_model().state_dict()
    sd['payload'] = _Exploit()
    with open(tmp_path / 'evil.pth', 'wb') as f:
        torch.save(sd, f, pickle_module=pickle)
    with pytest.raises(RuntimeError, match='weights_only=True blocked'):
        load(tmp_path / 'evil.pth')
    assert not marker.exists()


def write_hub_cache(cache, repo_id, filename, payload: bytes):
    """A Hugging Face cache as `hf_hub_download` leaves it: blobs by hash, snapshot symlinks, refs/main."""
    repo_dir = cache / f'models--{repo_id.replace("/", "--")}'
    blob = repo_dir / 'blobs' / hashlib.sha256(payload).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(payload)
    snapshot = repo_dir / 'snapshots' / HUB_REVISION
    snapshot.mkdir(parents=True)
    (snapshot / filename).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / 'refs').mkdir()
    (repo_dir / 'refs' / 'main').write_text(HUB_REVISION)


def run_offline(cache, script):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / 'hf_home'))
    return subprocess.run([sys.executable, '-c', textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize('name, filename', [('lookwhere_vitb_518', 'lookwhere_dinov2.pt'),
                                            ('lookwhere_vitb_franca_518', 'lookwhere_franca.pt')])
def test_pretrained_true_loads_the_authors_file_from_an_offline_hub_cache(tmp_path, images, name, filename):
    source = tiny_model(name)
    ckpt_path = tmp_path / filename
    torch.save(authors_layout(source), ckpt_path)
    write_hub_cache(tmp_path / 'hub', 'antofuller/lookwhere', filename, ckpt_path.read_bytes())
    x = images(2)
    torch.save(x, tmp_path / 'x.pt')
    result = run_offline(tmp_path / 'hub', f"""
        import torch, timm, timm_lookwhere
        from conftest import TINY
        model = timm.create_model('{name}', pretrained=True, **TINY).eval()
        with torch.no_grad():
            torch.save(model(torch.load(r'{tmp_path / "x.pt"}')), r'{tmp_path / "y.pt"}')
    """)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / 'y.pt'), source(x))


@pytest.mark.slow
def test_no_hub_and_no_cache_says_how_to_load_a_local_file(tmp_path):
    (tmp_path / 'hub').mkdir()
    result = run_offline(tmp_path / 'hub', """
        import timm, timm_lookwhere
        from conftest import TINY
        try:
            timm.create_model('lookwhere_vitb_518', pretrained=True, **TINY)
        except RuntimeError as err:
            print(err)
    """)
    assert result.returncode == 0, result.stderr
    assert 'lookwhere_dinov2.pt' in result.stdout and 'antofuller/lookwhere' in result.stdout
    assert 'pretrained_cfg_overlay=dict(file=' in result.stdout


def test_a_fine_tuned_file_keeps_its_head_when_num_classes_is_not_given(tmp_path, images):
    source = tiny_model(num_classes=7)
    safetensors.torch.save_file(source.state_dict(), tmp_path / 'finetuned.safetensors')
    model = load(tmp_path / 'finetuned.safetensors')  # the registry says num_classes=0 for the authors' weights
    assert model.num_classes == 7
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    # a call that asks for another head still gets a fresh one for its new task
    assert load(tmp_path / 'finetuned.safetensors', num_classes=3)(x).shape == (2, 3)


def _unreadable_files(folder):
    good = tiny_model(num_classes=0).state_dict()
    safetensors.torch.save_file(good, folder / 'good.safetensors')
    payload = (folder / 'good.safetensors').read_bytes()
    (folder / 'random.pth').write_bytes(os.urandom(4096))
    (folder / 'empty.pth').write_bytes(b'')
    (folder / 'truncated.safetensors').write_bytes(payload[:len(payload) // 2])
    torch.save(torch.randn(3), folder / 'tensor.pth')
    torch.save(good, folder / 'whole.pth')
    (folder / 'cut.pth').write_bytes((folder / 'whole.pth').read_bytes()[:2000])
    (folder / 'a_folder.pth').mkdir()


@pytest.mark.parametrize('name, error, match', [
    ('random.pth', (ValueError, RuntimeError), r'random\.pth: .*|random\.pth is not a readable PyTorch checkpoint'),
    ('empty.pth', ValueError, r'empty\.pth is empty \(0 bytes\).*A weights file is'),
    ('truncated.safetensors', ValueError, r'truncated\.safetensors is not a complete \.safetensors file'),
    ('tensor.pth', ValueError, r'tensor\.pth holds a Tensor, not a dict; a weights file is'),
    ('cut.pth', ValueError, r'cut\.pth is not a readable PyTorch checkpoint \(it is truncated\)'),
    ('a_folder.pth', IsADirectoryError, r'a_folder\.pth is a folder, not a weights file'),
])
def test_a_file_that_is_not_a_checkpoint_is_named_with_what_a_checkpoint_holds(tmp_path, name, error, match):
    _unreadable_files(tmp_path)
    with pytest.raises(error, match=match) as info:
        load(tmp_path / name)
    assert 'weights_only=False' not in str(info.value)  # never the advice to run the file's code

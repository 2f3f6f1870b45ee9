"""Hub export: `lookwhere convert` writes timm's Hub layout, timm and transformers rebuild the same
model from it (local folder, offline Hub cache), and `lookwhere push` uploads it."""
import argparse
import json
import socket

import pytest
import torch
from huggingface_hub import HfApi, constants

import timm
from timm.models import save_for_hf
from timm_lookwhere.cli import main
from timm_lookwhere.export import export_for_hf, model_from_checkpoint, push_to_hub

from conftest import TINY, authors_layout, tiny_model, write_hub_snapshot

TINY_KWARGS = [f'{key}={value}' for key, value in TINY.items()]


def outputs(model, x):
    with torch.no_grad():
        out = model.forward_all(x)
        return out['indices'], out['tokens'], model.forward_head(out['tokens'])


def assert_same_model(a, b, x):
    for out_a, out_b in zip(outputs(a, x), outputs(b, x)):
        assert torch.equal(out_a, out_b)


def convert(*argv):
    return main(['convert', *map(str, argv)])


@pytest.fixture
def fine_tuned(tmp_path):
    """A timm train.py checkpoint of a 5-class tiny LookWhere fine-tuned at k_ratio=0.25, with EMA weights."""
    model = tiny_model(num_classes=5, k_ratio=0.25)
    ema = tiny_model(num_classes=5, k_ratio=0.25, seed=1)
    args = argparse.Namespace(model='lookwhere_vitb_518', model_kwargs=dict(TINY, k_ratio=0.25), img_size=None,
                              input_size=None, num_classes=5, lr=1e-4)
    path = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 3, 'arch': 'lookwhere_vitb_518', 'args': args, 'version': 2,
                'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},  # as DDP saves it
                'state_dict_ema': ema.state_dict()}, path)
    return path, model, ema


# ------------------------------------------------------------------------------------------------
# convert


@pytest.mark.parametrize('name', ['lookwhere_vitb_518', 'lookwhere_vitb_franca_518'])
def test_convert_authors_file_infers_architecture_and_local_dir_rebuilds_it(tmp_path, images, name):
    source = tiny_model(name, num_classes=0)
    torch.save(authors_layout(source), tmp_path / 'authors.pt')
    assert convert(tmp_path / 'authors.pt', tmp_path / 'out', '--model-kwargs', *TINY_KWARGS) == 0
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    rebuilt = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    assert rebuilt.pretrained_cfg['architecture'] == name
    assert_same_model(rebuilt, source, images(2))


def test_config_has_architecture_num_classes_k_and_pretrained_cfg_but_no_num_classes_in_model_args(tmp_path):
    source = tiny_model(num_classes=0)
    torch.save(authors_layout(source), tmp_path / 'lookwhere_dinov2.pt')
    assert convert(tmp_path / 'lookwhere_dinov2.pt', tmp_path / 'out', '--k', 7, '--model-kwargs', *TINY_KWARGS) == 0
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['architecture'] == 'lookwhere_vitb_518' and config['num_classes'] == 0
    assert config['model_args']['k'] == 7 and 'k_ratio' not in config['model_args']
    assert 'num_classes' not in config['model_args']  # transformers passes num_classes itself
    assert config['pretrained_cfg']['input_size'] == [3, 112, 112]
    assert config['pretrained_cfg']['license'] == 'mit'
    assert 'hf_hub_id' not in config['pretrained_cfg']  # the authors' source must not leak into the export
    assert timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).k == 7


def test_convert_train_checkpoint_keeps_head_k_and_settings_and_picks_ema_on_request(tmp_path, images, fine_tuned):
    path, model, ema = fine_tuned
    x = images(2)
    for flags, expected, out in (([], model, 'raw'), (['--ema'], ema, 'ema')):
        assert convert(path, tmp_path / out, *flags) == 0  # arch and kwargs come from the checkpoint's args
        rebuilt = timm.create_model(f'local-dir:{tmp_path / out}', pretrained=True).eval()
        assert rebuilt.num_classes == 5 and rebuilt.k_ratio == 0.25
        assert_same_model(rebuilt, expected, x)


def test_k_given_to_convert_replaces_the_one_the_checkpoint_recorded(tmp_path, fine_tuned):
    assert convert(fine_tuned[0], tmp_path / 'out', '--k', 9) == 0  # the checkpoint's args say k_ratio=0.25
    args = json.loads((tmp_path / 'out' / 'config.json').read_text())['model_args']
    assert args['k'] == 9 and 'k_ratio' not in args


def test_export_records_k_set_after_creation(tmp_path):
    model = tiny_model(k=5)
    model.set_k(k_ratio=0.5)
    export_for_hf(model, tmp_path / 'out')
    args = json.loads((tmp_path / 'out' / 'config.json').read_text())['model_args']
    assert args['k_ratio'] == 0.5 and 'k' not in args
    assert timm.create_model(f'local-dir:{tmp_path / "out"}').k == model.k == 32


def test_model_card_says_what_it_is_its_license_and_how_to_load_it(tmp_path):
    export_for_hf(tiny_model(num_classes=5), tmp_path / 'out', repo_id='someone/lookwhere-tiny',
                  source='fine-tuned on a toy task')
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert card.startswith('---\n') and '\nlicense: mit\n' in card and '\nlibrary_name: timm\n' in card
    assert '- image-classification' in card and '# Model card for lookwhere-tiny' in card
    assert 'timm.create_model("hf-hub:someone/lookwhere-tiny", pretrained=True)' in card
    assert 'AutoModelForImageClassification.from_pretrained("someone/lookwhere-tiny")' in card
    assert 'k = 6 of 64' in card and 'fine-tuned on a toy task' in card
    assert 'https://arxiv.org/abs/2505.18051' in card and 'eprint={2505.18051}' in card


def test_timm_save_for_hf_output_loads_back_in_timm(tmp_path, images):
    source = tiny_model(num_classes=3)
    save_for_hf(source, tmp_path / 'out', safe_serialization=True)
    rebuilt = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    assert_same_model(rebuilt, source, images(2))


def test_hf_hub_name_rebuilds_the_export_from_an_offline_cache(tmp_path, images, monkeypatch):
    source = tiny_model(num_classes=4)
    export_for_hf(source, tmp_path / 'out', repo_id='someone/lookwhere-tiny')
    write_hub_snapshot(tmp_path / 'hub', 'someone/lookwhere-tiny', tmp_path / 'out')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)  # read at call time by huggingface_hub
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    rebuilt = timm.create_model('hf-hub:someone/lookwhere-tiny', pretrained=True).eval()
    assert_same_model(rebuilt, source, images(2))


def test_convert_reports_what_is_wrong(tmp_path, fine_tuned, capsys):
    assert convert(tmp_path / 'missing.pt', tmp_path / 'out') == 2
    assert 'no checkpoint file at' in capsys.readouterr().err
    torch.save(timm.create_model('resnet18', num_classes=3).state_dict(), tmp_path / 'resnet.pth')
    assert convert(tmp_path / 'resnet.pth', tmp_path / 'out') == 2
    assert 'not a LookWhere checkpoint' in capsys.readouterr().err
    assert convert(tmp_path / 'resnet.pth', tmp_path / 'out', '--model', 'resnet18') == 2
    assert "'resnet18' is not a LookWhere model" in capsys.readouterr().err
    torch.save(authors_layout(tiny_model()), tmp_path / 'authors.pt')
    assert convert(tmp_path / 'authors.pt', tmp_path / 'out', '--ema', '--model-kwargs', *TINY_KWARGS) == 2
    assert 'has no EMA weights' in capsys.readouterr().err
    assert convert(fine_tuned[0], tmp_path / 'out', '--model-kwargs', 'embed_dim=48') == 2  # weights of another width
    assert 'does not fit lookwhere_vitb_518' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_model_from_checkpoint_refuses_a_num_classes_its_head_does_not_have(fine_tuned):
    with pytest.raises(ValueError, match="num_classes=10 but the checkpoint's head has 5 classes"):
        model_from_checkpoint(fine_tuned[0], num_classes=10)


# ------------------------------------------------------------------------------------------------
# transformers' timm wrapper on the export


@pytest.fixture
def exported_classifier(tmp_path):
    model = tiny_model(num_classes=5)
    export_for_hf(model, tmp_path / 'out')
    return model, tmp_path / 'out'


def test_transformers_classifier_from_export_gives_the_timm_logits(exported_classifier, images):
    from transformers import AutoModelForImageClassification, TimmWrapperForImageClassification
    model, folder = exported_classifier
    wrapped = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert isinstance(wrapped, TimmWrapperForImageClassification)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(pixel_values=x).logits, model(x))


def test_transformers_automodel_gives_features_pooled_output_and_dense_hidden_states(exported_classifier, images):
    from transformers import AutoModel, TimmWrapperModel
    model, folder = exported_classifier
    wrapped = AutoModel.from_pretrained(folder).eval()
    assert isinstance(wrapped, TimmWrapperModel)
    x = images(2)
    with torch.no_grad():
        out = wrapped(pixel_values=x, output_hidden_states=True)
        features, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(out.last_hidden_state, features)
        torch.testing.assert_close(out.pooler_output, model.forward_head(features, pre_logits=True))
    assert len(out.hidden_states) == len(intermediates) == TINY['depth']
    for hidden, expected in zip(out.hidden_states, intermediates):
        assert hidden.shape == (2, TINY['embed_dim'], 8, 8)  # dense over the whole 8x8 grid
        torch.testing.assert_close(hidden, expected)


def test_transformers_image_processor_prepares_images_as_timm_does(exported_classifier):
    from PIL import Image
    from transformers import AutoImageProcessor
    _, folder = exported_classifier
    image = Image.fromarray(torch.randint(0, 256, (150, 130, 3), dtype=torch.uint8).numpy())
    processor = AutoImageProcessor.from_pretrained(folder)
    pixel_values = processor(image, return_tensors='pt')['pixel_values']
    exported = timm.create_model(f'local-dir:{folder}')
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=exported))
    assert pixel_values.shape == (1, 3, 112, 112)
    torch.testing.assert_close(pixel_values, transform(image).unsqueeze(0), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# push


@pytest.fixture
def export_folder(tmp_path):
    return export_for_hf(tiny_model(), tmp_path / 'out')


@pytest.fixture
def no_token(tmp_path, monkeypatch):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'))
    monkeypatch.setattr(constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'no-stored-tokens'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)


def test_push_creates_the_repo_and_uploads_the_folder(export_folder, no_token, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(HfApi, 'create_repo', lambda self, repo_id, **kw: calls.append(('create', repo_id, kw)))

    def upload_folder(self, **kw):
        calls.append(('upload', self.token, kw))
        return 'https://huggingface.co/someone/lookwhere-tiny/commit/abc'
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    assert main(['push', str(export_folder), 'someone/lookwhere-tiny', '--private', '--token', 'hf_test']) == 0
    assert calls == [
        ('create', 'someone/lookwhere-tiny', dict(private=True, exist_ok=True)),
        ('upload', 'hf_test', dict(repo_id='someone/lookwhere-tiny', folder_path=str(export_folder), revision=None,
                                   commit_message='Add LookWhere model')),
    ]
    assert 'someone/lookwhere-tiny/commit/abc' in capsys.readouterr().out


def test_push_without_a_token_says_how_to_log_in(export_folder, no_token, capsys):
    assert main(['push', str(export_folder), 'someone/lookwhere-tiny']) == 1
    err = capsys.readouterr().err
    assert 'no Hugging Face token' in err and 'hf auth login' in err and 'HF_TOKEN' in err


def test_push_without_network_fails_with_a_clear_message(export_folder, no_token, monkeypatch, capsys):
    with socket.socket() as s:  # a local port nothing listens on: the connection is refused at once
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, 'ENDPOINT', f'http://127.0.0.1:{port}')
    assert main(['push', str(export_folder), 'someone/lookwhere-tiny', '--token', 'hf_test']) == 1
    err = capsys.readouterr().err
    assert f'upload of {export_folder} to http://127.0.0.1:{port}/someone/lookwhere-tiny failed' in err
    assert 'ConnectError' in err or 'Connection' in err


def test_push_checks_folder_and_repo_id_before_any_network(tmp_path, export_folder, no_token):
    with pytest.raises(ValueError, match='lacks config.json and model.safetensors'):
        push_to_hub(tmp_path, 'someone/lookwhere-tiny', token='hf_test')
    with pytest.raises(ValueError, match='give the repo as ORG/NAME'):
        push_to_hub(export_folder, 'lookwhere-tiny', token='hf_test')
    with pytest.raises(ValueError, match='bad repo id'):
        push_to_hub(export_folder, 'someone/look where', token='hf_test')


def test_convert_refuses_a_folder_with_files_unless_overwrite_and_keeps_the_others(tmp_path, fine_tuned, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'README.md').write_text('my notes')
    assert convert(fine_tuned[0], out) == 2
    err = capsys.readouterr().err
    assert 'not empty (it would replace README.md)' in err and '--overwrite' in err
    assert (out / 'README.md').read_text() == 'my notes' and not (out / 'model.safetensors').exists()
    (out / 'notes.txt').write_text('kept')
    assert convert(fine_tuned[0], out, '--overwrite') == 0
    assert (out / 'README.md').read_text() != 'my notes' and (out / 'notes.txt').read_text() == 'kept'
    (tmp_path / 'a_file').write_text('x')
    assert convert(fine_tuned[0], tmp_path / 'a_file') == 2
    assert 'is a file, not a folder' in capsys.readouterr().err
    with pytest.raises(FileExistsError, match='not empty'):
        export_for_hf(tiny_model(), out)


@pytest.mark.parametrize('call', [dict(k=8), dict(k_ratio=0.5)])
@pytest.mark.parametrize('saved', [dict(k_ratio=0.1), dict(k=4)])
def test_a_calls_k_replaces_the_k_an_export_records(tmp_path, saved, call):
    export_for_hf(tiny_model(**saved), tmp_path / 'out')
    model = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True, **call)
    assert model.k == call.get('k', int(call.get('k_ratio', 0) * 64))
    assert timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).k == saved.get('k', 6)

"""What-where distillation (timm_lookwhere.distillation, and its command line timm_lookwhere.distill): objective,
teacher hook, student init, CLI runs."""
import contextlib
import io
import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

import timm
from timm.data.dataset import IterableImageDataset
from timm.layers import resample_abs_pos_embed

from conftest import TINY, randomize_
from timm_lookwhere import cli
from timm_lookwhere.distill import main
from timm_lookwhere.distillation import (
    DistillTeacher, Distiller, ResumableSampler, SeededImageDataset, TeacherTargetCache, default_k_range,
    distillation_losses, image_batches, init_student_from_teacher, resolve_k_range, train_step,
)

TEACHER = 'vit_base_patch14_reg4_dinov2'
# the teacher matching conftest's TINY student (112 px, 8x8 grid, width 32, 2 blocks, 2 heads, 4 registers)
TINY_TEACHER = {key: TINY[key] for key in ('img_size', 'embed_dim', 'depth', 'num_heads')}
TINY_KWARGS = [f'{key}={TINY[key]}' for key in ('embed_dim', 'depth', 'num_heads')]  # as typed on the command line
TINY_MODEL_KWARGS = [f'{key}={value}' for key, value in TINY.items() if key != 'img_size']
NUM_PATCHES = 64
RESULT_KEYS = ('step', 'loss', 'loss_cls', 'loss_patch', 'loss_map', 'lr', 'k')
PROG = 'python -m timm_lookwhere.distill'


def tiny_teacher(name=TEACHER, seed=0, randomize=True, **kwargs):
    torch.manual_seed(seed)
    teacher = timm.create_model(name, num_classes=0, **dict(TINY_TEACHER, **kwargs))
    return (randomize_(teacher) if randomize else teacher).eval()


def tiny_student(**kwargs):
    return timm.create_model('lookwhere_vitb_518', num_classes=0, freeze_selector=False, **dict(TINY, **kwargs))


def distill_pair(seed=0):
    teacher = tiny_teacher(seed=seed)
    student = tiny_student()
    init_student_from_teacher(student, teacher)
    student.set_selector_trainable(True, head=True)
    return DistillTeacher(teacher), Distiller(student.train())


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are all per-op overhead: a second intra-op thread only adds waiting (6x slower
    on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def run_files(tmp_path_factory):
    """A small image folder (two classes, odd-sized RGB images) and a tiny teacher checkpoint."""
    root = tmp_path_factory.mktemp('distill')
    rng = np.random.default_rng(0)
    for label in ('a', 'b'):
        os.makedirs(root / 'images' / label)
        for i in range(8):
            pixels = rng.integers(0, 256, (130, 150, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / 'images' / label / f'{i}.png')
    torch.save(tiny_teacher().state_dict(), root / 'teacher.pth')
    return root


def cli_args(files, output, *extra):
    return [
        '--teacher', TEACHER, '--teacher-checkpoint', str(files / 'teacher.pth'), '--teacher-kwargs', *TINY_KWARGS,
        '--model', 'lookwhere_vitb_518', '--model-kwargs', *TINY_MODEL_KWARGS, '--img-size', '112',
        '--data-dir', str(files / 'images'), '--batch-size', '4', '--lr', '1e-3', '--warmup-steps', '1',
        '--log-every', '1', '--workers', '0', '--device', 'cpu', '--output', str(output), *extra,
    ]


def refusal(argv, command=None, prog=PROG):
    """The message a command line (`main`, or `command`) refuses ARGV with: argparse's form (PROG: error: ...),
    exit code 2, no traceback."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(stderr):
        (command or main)(argv)
    text = stderr.getvalue()
    assert exit_info.value.code == 2 and f'{prog}: error: ' in text and 'Traceback' not in text, text
    return text.split(f'{prog}: error: ', 1)[1]


def assert_refused(argv, pattern):
    message = refusal(argv)
    assert re.search(pattern, message, re.DOTALL), message
    return message


def read_metrics(output):
    with open(os.path.join(output, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------
# k range


def test_k_range_is_16_to_128_at_518_px_and_scales_with_the_grid():
    assert default_k_range(37 * 37) == (16, 128)
    assert default_k_range(74 * 74) == (64, 512)  # 1036 px: four times the patches
    assert default_k_range(NUM_PATCHES) == (1, 6)  # 112 px: at least one patch
    assert resolve_k_range(NUM_PATCHES, k_min=3) == (3, 6)
    assert resolve_k_range(NUM_PATCHES, k_min=10) == (10, 10)  # k_max follows a larger k_min


@pytest.mark.parametrize('k_min, k_max', [(0, 4), (5, 4), (1, 65)])
def test_k_range_outside_the_grid_is_rejected(k_min, k_max):
    with pytest.raises(ValueError, match='k_min'):
        resolve_k_range(NUM_PATCHES, k_min, k_max)


# --------------------------------------------------------------------------------------------
# objective


def test_each_loss_term_matches_a_hand_computation():
    # 2x2 grid, one prefix token, width 2; the student saw cells 0 and 3.
    tokens = torch.tensor([[1., 2.], [0., 2.], [4., 0.]])  # cls, cell 0, cell 3
    student = dict(
        tokens=tokens.expand(2, 3, 2),
        indices=torch.tensor([[0, 3], [0, 3]]),
        map=torch.tensor([[0., 0., 0., math.log(2)]] * 2),
    )
    # cells 1 and 2 are 1 away from both chosen cells: filled with their mean (2, 1)
    filled = torch.tensor([[0., 2.], [2., 1.], [2., 1.], [4., 0.]])
    teacher = dict(
        cls=torch.tensor([[0., 0.], [1., 2.]]),  # image 0: errors 1 and 4; image 1: exact
        patches=torch.stack([torch.tensor([[0., 2.], [2., 3.], [0., 1.], [4., 0.]]), filled]),  # image 0: 4 + 4
        attn=torch.tensor([[0., 0., 0., 0.], [0., 0., 0., math.log(2)]]),  # image 1 equals the student map
    )
    losses = distillation_losses(student, teacher, (2, 2), num_prefix_tokens=1)

    expected_cls = (1 + 4) / 4  # mean over images and channels
    expected_patch = (4 + 4) / 16  # mean over images, cells and channels
    # KL(uniform || softmax(0, 0, 0, ln 2) = (1/5, 1/5, 1/5, 2/5)), summed over cells, mean over images
    kl_image0 = 3 / 4 * math.log((1 / 4) / (1 / 5)) + 1 / 4 * math.log((1 / 4) / (2 / 5))
    expected_map = kl_image0 / 2
    assert losses['loss_cls'].item() == pytest.approx(expected_cls, rel=1e-6)
    assert losses['loss_patch'].item() == pytest.approx(expected_patch, rel=1e-6)
    assert losses['loss_map'].item() == pytest.approx(expected_map, rel=1e-5)
    assert losses['loss'].item() == pytest.approx(expected_cls + expected_patch + 0.1 * expected_map, rel=1e-6)

    reweighted = distillation_losses(student, teacher, (2, 2), 1, weights=dict(cls=0., map=1.))
    assert reweighted['loss'].item() == pytest.approx(expected_patch + expected_map, rel=1e-6)


@pytest.mark.parametrize('queries', ['patch', 'cls'])
def test_teacher_attention_target_matches_timm_unfused_attention(queries, images):
    teacher = tiny_teacher()
    x = images(batch=2)
    targets = DistillTeacher(teacher, attn_queries=queries)(x)

    # independent: timm's own unfused attention, its softmax read at attn_drop
    attn = teacher.blocks[-1].attn
    attn.fused_attn = False
    probs = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, args, out: probs.setdefault('p', args[0]))
    with torch.no_grad():
        tokens = teacher.forward_features(x)
    handle.remove()
    P = teacher.num_prefix_tokens  # 5
    log_probs = probs['p'].log()  # (B, H, T, T): logits minus a per-query constant
    rows = log_probs[:, :, P:] if queries == 'patch' else log_probs[:, :, :1]
    expected = rows.mean(dim=(1, 2))[:, P:]  # (B, N): mean over heads and queries, patch keys
    # the per-query constants average to one constant per image, which softmax ignores
    center = lambda t: t - t.mean(dim=1, keepdim=True)  # noqa: E731
    assert targets['attn'].shape == (2, NUM_PATCHES)
    torch.testing.assert_close(center(targets['attn']), center(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(targets['cls'], tokens[:, 0])
    torch.testing.assert_close(targets['patches'], tokens[:, P:])


def test_teacher_stays_frozen_and_in_eval():
    teacher = DistillTeacher(tiny_teacher())
    teacher.train()
    assert not teacher.vit.training
    assert not any(p.requires_grad for p in teacher.parameters())


# --------------------------------------------------------------------------------------------
# student initialisation


@pytest.mark.parametrize('name, reg_tokens', [(TEACHER, 4), ('vit_small_patch14_dinov2', 0)])
def test_student_starts_as_the_teacher(name, reg_tokens, images):
    """The extractor fed the teacher's prefix reproduces the teacher; a full-size selector of all the
    teacher's blocks reproduces it too (covers cls position embeddings folded into the token)."""
    teacher = tiny_teacher(name)
    student = tiny_student(reg_tokens=reg_tokens, selector_img_size=112, selector_depth=2)
    init_student_from_teacher(student, teacher)
    x = images(batch=2)
    with torch.no_grad():
        expected = teacher.forward_features(x)  # (B, P + N, D)
        P = teacher.num_prefix_tokens
        all_patches = torch.arange(NUM_PATCHES).expand(2, -1)
        prefix = teacher._pos_embed(teacher.patch_embed(x))[:, :P]  # the teacher's own cls (and reg) inputs
        tokens = torch.cat([prefix, student.embed_patches(x, all_patches)], dim=1)
        extracted = student.norm(student.blocks(tokens))
        selected = student.selector.backbone.forward_features(x)
    torch.testing.assert_close(extracted[:, P:], expected[:, P:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(selected, expected, atol=1e-5, rtol=1e-5)


def test_selector_gets_resized_position_embeddings_and_random_heads():
    teacher = tiny_teacher()
    student = tiny_student()  # selector at 42 px: a 3x3 grid, 1 block
    init_student_from_teacher(student, teacher)
    selector = student.selector.backbone
    expected_pos = resample_abs_pos_embed(
        teacher.pos_embed, new_size=(3, 3), num_prefix_tokens=0, interpolation='bicubic', antialias=False)
    torch.testing.assert_close(selector.pos_embed, expected_pos)
    torch.testing.assert_close(selector.cls_token, teacher.cls_token)
    torch.testing.assert_close(selector.reg_token, teacher.reg_token)
    torch.testing.assert_close(selector.blocks[0].state_dict(), teacher.blocks[0].state_dict())
    torch.testing.assert_close(student.pos_embed, teacher.pos_embed)  # same 8x8 grid
    for fc in (student.selector.head.fc1, student.selector.head.fc2):
        assert 0.01 < fc.weight.std().item() < 0.03  # timm's ViT init: truncated normal, std 0.02
        assert not fc.bias.any()


@pytest.mark.parametrize('teacher_kwargs, message', [
    (dict(name='vit_base_patch16_224', reg_tokens=4, no_embed_class=True, init_values=1e-5),
     'teacher patch size \\(16, 16\\) cannot serve a student with patch size \\(14, 14\\)'),
    (dict(embed_dim=48), 'teacher width 48 cannot serve a student of width 32'),
    (dict(depth=3), 'teacher has 3 blocks, the student 2'),
    (dict(reg_tokens=0), 'teacher has 0 register tokens, the student 4'),
    (dict(qk_norm=True), "teacher parameters the student lacks: \\['blocks.0.attn.q_norm.weight'"),
])
def test_teacher_that_cannot_serve_fails_clearly(teacher_kwargs, message):
    teacher = tiny_teacher(**teacher_kwargs, randomize=False)
    with pytest.raises(ValueError, match=message):
        init_student_from_teacher(tiny_student(), teacher)


# --------------------------------------------------------------------------------------------
# optimisation


def test_loss_halves_within_60_steps_on_a_fixed_batch(images):
    """With 48 of 64 patches seen the filled grid can approach the teacher's; k is fixed so the
    loss is comparable from step to step."""
    teacher, distiller = distill_pair()
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-3)
    x = images(batch=4)
    history = [train_step(distiller, teacher, [x], optimizer, k=48) for _ in range(60)]
    first, last = history[0], history[-1]
    assert last['loss'] < 0.5 * first['loss'], (first, last)
    assert last['loss_cls'] < first['loss_cls'] and last['loss_map'] < first['loss_map']


def test_gradient_accumulation_equals_one_large_batch(images):
    x = images(batch=4)
    grads = []
    for micro_batches in ([x], [x[:2], x[2:]]):
        teacher, distiller = distill_pair()
        before = {n: p.detach().clone() for n, p in distiller.named_parameters()}
        optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=1.0)
        train_step(distiller, teacher, micro_batches, optimizer, k=5)
        grads.append({n: before[n] - p.detach() for n, p in distiller.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------
# data stream


def test_resumed_sampler_continues_the_stream_across_epochs():
    dataset = list(range(10))
    full = list(islice(iter(ResumableSampler(dataset, seed=3)), 35))
    assert sorted(i for i, _ in full[:10]) == dataset  # an epoch is a permutation
    assert full[:10] != full[10:20]  # reshuffled every epoch, with new augmentation seeds
    assert list(islice(iter(ResumableSampler(dataset, seed=3, start=23)), 12)) == full[23:]
    ranks = [list(islice(iter(ResumableSampler(dataset, num_replicas=2, rank=r, seed=3)), 5)) for r in (0, 1)]
    assert sorted(i for rank in ranks for i, _ in rank) == dataset  # the ranks split one epoch


def test_augmentation_depends_on_the_sample_seed_only():
    transform = timm.data.create_transform(112, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (130, 150, 3), dtype=np.uint8))
    dataset = SeededImageDataset([(image, 0)], transform)
    first = dataset[0, 7]
    torch.rand(100), np.random.rand(100)  # whatever ran before must not matter
    assert torch.equal(dataset[0, 7], first)
    assert not torch.equal(dataset[0, 8], first)


def test_streaming_datasets_give_endless_batches():
    image = Image.fromarray(np.zeros((112, 112, 3), dtype=np.uint8))
    dataset = IterableImageDataset(None, reader=[(image, 0)] * 5)  # timm's wrapper around any sample iterable
    transform = timm.data.create_transform(112)
    batches = list(islice(image_batches(dataset, transform, batch_size=2), 5))  # 2 per epoch: spans 3 epochs
    assert all(batch.shape == (2, 3, 112, 112) for batch in batches)


# --------------------------------------------------------------------------------------------
# command line runs


def test_resume_reproduces_the_uninterrupted_run_exactly(run_files, tmp_path):
    whole = tmp_path / 'whole'
    main(cli_args(run_files, whole, '--steps', '4', '--save-every', '2', '--keep-every', '2'))
    records = read_metrics(whole)
    assert [r['step'] for r in records] == [1, 2, 3, 4]
    assert set(RESULT_KEYS) <= set(records[0])
    assert len({r['k'] for r in records}) > 1 and all(1 <= r['k'] <= 6 for r in records)  # k drawn per step

    # "crash" after step 2: the same folder, its step-2 checkpoint, and more data workers this time
    resumed = tmp_path / 'resumed'
    shutil.copytree(whole, resumed)
    main(cli_args(run_files, resumed, '--steps', '4', '--workers', '2', '--resume', str(resumed / 'checkpoint-2.pth')))
    again = read_metrics(resumed)
    assert [r['step'] for r in again] == [1, 2, 3, 4]  # the records after step 2 were replaced, not appended
    for before, after in zip(records[2:], again[2:]):
        assert {k: before[k] for k in RESULT_KEYS} == {k: after[k] for k in RESULT_KEYS}
    final = torch.load(whole / 'last.pth', weights_only=True)['state_dict']
    final_resumed = torch.load(resumed / 'last.pth', weights_only=True)['state_dict']
    assert all(torch.equal(final[k], final_resumed[k]) for k in final)

    # the result loads with timm, and an existing run is not overwritten by accident
    model = timm.create_model('lookwhere_vitb_518', pretrained=True, pretrained_cfg_overlay=dict(file=str(
        whole / 'last.pth')), **TINY)
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    assert_refused(cli_args(run_files, whole, '--steps', '4'), 'last.pth exists: pass --resume')


def test_bfloat16_autocast_run_on_cpu(run_files, tmp_path):
    main(cli_args(run_files, tmp_path, '--steps', '2', '--amp', '--no-aug'))
    records = read_metrics(tmp_path)
    assert len(records) == 2 and all(math.isfinite(r['loss']) for r in records)


class CountingTeacher(DistillTeacher):
    """Counts the images it runs on."""
    images_seen = 0

    def forward(self, x):
        self.images_seen += len(x)
        return super().forward(x)


def test_teacher_cache_computes_each_images_targets_once_and_reads_them_back(tmp_path, images):
    teacher = CountingTeacher(tiny_teacher())
    x = images(6, 112, seed=4)
    cache = TeacherTargetCache(teacher, str(tmp_path / 'cache'), num_images=10, num_patches=NUM_PATCHES,
                               embed_dim=32, description=dict(teacher='tiny'))
    first = cache(x[:4], torch.tensor([0, 1, 2, 3]))
    again = cache(x[2:6], torch.tensor([2, 3, 4, 5]))  # two seen, two new
    assert teacher.images_seen == 6 and cache.num_filled == 6
    direct = teacher(x)
    for key in ('cls', 'patches', 'attn'):  # batched otherwise: another CPU may sum in another order
        torch.testing.assert_close(first[key], direct[key][:4], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again[key], direct[key][2:6], rtol=1e-5, atol=1e-5)
    # a new process reopens the folder and finds the rows filled
    cache.flush()
    reopened = TeacherTargetCache(teacher, str(tmp_path / 'cache'), 10, NUM_PATCHES, 32, dict(teacher='tiny'))
    before = teacher.images_seen
    torch.testing.assert_close(reopened(x[:2], torch.tensor([0, 1]))['patches'], direct['patches'][:2],
                               rtol=1e-5, atol=1e-5)
    assert teacher.images_seen == before
    with pytest.raises(ValueError, match='another teacher or other data'):
        TeacherTargetCache(teacher, str(tmp_path / 'cache'), 10, NUM_PATCHES, 32, dict(teacher='other'))


def test_run_with_teacher_cache_gives_the_losses_of_a_run_without(run_files, tmp_path):
    plain, cached = tmp_path / 'plain', tmp_path / 'cached'
    main(cli_args(run_files, plain, '--steps', '6', '--no-aug'))  # 16 images, 4 per step: every image twice
    main(cli_args(run_files, cached, '--steps', '6', '--no-aug', '--teacher-cache', str(tmp_path / 'targets')))
    assert len(read_metrics(plain)) == len(read_metrics(cached)) == 6
    for a, b in zip(read_metrics(plain), read_metrics(cached)):
        for key in RESULT_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert int(np.fromfile(tmp_path / 'targets' / 'filled.u8', dtype=np.uint8).sum()) == 16
    assert_refused(cli_args(run_files, tmp_path / 'aug', '--steps', '2', '--teacher-cache', str(tmp_path / 'targets')),
                   'needs fixed inputs: add --no-aug')


def test_teacher_kwargs_may_repeat_the_students_size_and_set_the_classifier(run_files, tmp_path):
    main(cli_args(run_files, tmp_path / 'same', '--steps', '2', '--teacher-kwargs', *TINY_KWARGS, 'img_size=112',
                  'num_classes=5'))  # honoured: the same grid, a classifier the losses never read
    assert len(read_metrics(tmp_path / 'same')) == 2
    assert_refused(cli_args(run_files, tmp_path / 'other', '--steps', '2', '--teacher-kwargs', *TINY_KWARGS,
                            'img_size=224'), r'img_size=224 differs from the student\'s 112x112.*--img-size')


@pytest.mark.slow
def test_teacher_weights_missing_offline_say_which_and_how_to_pass_a_file(run_files, tmp_path):
    args = cli_args(run_files, tmp_path / 'out', '--steps', '2')
    i = args.index('--teacher-checkpoint')
    del args[i:i + 2]  # no file: the teacher's Hub weights, without network or cache
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    result = subprocess.run([sys.executable, '-m', 'timm_lookwhere.distill', *args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode != 0
    assert 'could not get the teacher weights of vit_base_patch14_reg4_dinov2' in result.stderr
    assert 'timm/vit_base_patch14_reg4_dinov2.lvd142m' in result.stderr and '--teacher-checkpoint FILE' in result.stderr
    assert 'LocalEntryNotFoundError' not in result.stderr.splitlines()[-1]


@pytest.mark.parametrize('extra, message', [
    (['--steps', '5', '--warmup-steps', '5'], '--warmup-steps'),
    (['--steps', '2', '--amp', '--amp-dtype', 'float16'], 'float16 needs a CUDA device'),
    (['--steps', '2', '--teacher-random-init'], 'not both'),
    (['--steps', '2', '--k-max', '65'], 'k_min'),
    (['--steps', '2', '--teacher-kwargs', 'embed_dim=48', 'depth=2', 'num_heads=2'], 'teacher width 48'),
])
def test_bad_run_arguments_are_rejected(run_files, tmp_path, extra, message):
    args = cli_args(run_files, tmp_path, *extra)
    if '--teacher-kwargs' in extra:  # a random teacher of another width: no checkpoint to load
        args[args.index('--teacher-checkpoint'):args.index('--teacher-checkpoint') + 2] = ['--teacher-random-init']
    assert_refused(args, message)


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process_with_twice_the_batch(run_files, tmp_path):
    two = tmp_path / 'two'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               '-m', 'timm_lookwhere.distill', *cli_args(run_files, two, '--steps', '3', '--batch-size', '2')]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Process 1 of 2' in result.stderr

    one = tmp_path / 'one'
    main(cli_args(run_files, one, '--steps', '3', '--batch-size', '4'))
    two_records, one_records = read_metrics(two), read_metrics(one)
    assert [r['step'] for r in two_records] == [1, 2, 3]  # only rank 0 wrote
    for a, b in zip(two_records, one_records):  # same images, gradients averaged over the two halves
        for key in RESULT_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert os.path.isfile(two / 'last.pth')


@pytest.mark.filterwarnings('ignore:.*found in sys.modules:RuntimeWarning')  # runpy re-runs the imported module
def test_cli_entry_points_offer_the_distill_command(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['distill', '--help'])
    assert exit_info.value.code == 0
    assert '--teacher-checkpoint' in capsys.readouterr().out
    monkeypatch.setattr(sys, 'argv', ['distill', '--help'])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module('timm_lookwhere.distill', run_name='__main__')
    assert exit_info.value.code == 0
    assert '--k-min' in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# learning: the selector learns where the teacher looks


GRID, PATCH, REGION = 8, 14, 2  # an 8x8 grid of 14 px patches; the signal fills a 2x2 block of patches


def signal_image(rng):
    """Dim noise with one bright REGION x REGION block of patches; returns the image and its cells."""
    pixels = rng.integers(40, 80, (GRID * PATCH, GRID * PATCH, 3)).astype(np.uint8)
    row, col = rng.integers(0, GRID - REGION + 1, 2)
    pixels[row * PATCH:(row + REGION) * PATCH, col * PATCH:(col + REGION) * PATCH] = rng.integers(
        200, 256, (REGION * PATCH, REGION * PATCH, 3))
    cells = [(row + i) * GRID + col + j for i in range(REGION) for j in range(REGION)]
    return pixels, cells


def to_model_input(pixels):
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((torch.tensor(np.stack(pixels)).float() / 255 - mean) / std).permute(0, 3, 1, 2)


def brightness_teacher():
    """A teacher whose last-block attention logits are the patch brightness: constant queries, keys
    reading an embedding channel that holds each patch's mean intensity (timm init leaves the blocks
    near identity through layer-scale 1e-5)."""
    teacher = tiny_teacher(randomize=False)
    dim, head_dim = 32, 16
    with torch.no_grad():
        teacher.patch_embed.proj.weight[0] = 1 / (3 * PATCH * PATCH)  # channel 0: mean intensity
        qkv = teacher.blocks[-1].attn.qkv
        qkv.weight[:2 * dim] = 0
        qkv.bias[:2 * dim] = 0
        qkv.bias[0] = qkv.bias[head_dim] = 20.  # every query of both heads: (20, 0, ...)
        qkv.weight[dim, 0] = qkv.weight[dim + head_dim, 0] = 1.  # keys: (channel 0, 0, ...)
    return teacher


def region_coverage(indices, cells):
    return float(np.mean([len(set(chosen.tolist()) & set(c)) / len(c) for chosen, c in zip(indices, cells)]))


@pytest.mark.slow
def test_selector_learns_to_look_where_the_teacher_attends(tmp_path):
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / 'images' / 'x')
    for i in range(64):
        Image.fromarray(signal_image(rng)[0]).save(tmp_path / 'images' / 'x' / f'{i}.png')
    teacher = brightness_teacher()
    torch.save(teacher.state_dict(), tmp_path / 'teacher.pth')
    pixels, cells = zip(*[signal_image(rng) for _ in range(64)])  # held-out images
    x = to_model_input(pixels)
    k = REGION * REGION  # 4 of 64 patches: a random choice covers 4/64 = 6.25% of the region
    chance = k / NUM_PATCHES
    assert region_coverage(DistillTeacher(teacher)(x)['attn'].topk(k).indices, cells) == 1.0

    untrained = tiny_student(k=k)
    init_student_from_teacher(untrained, teacher)
    with torch.no_grad():
        before = region_coverage(untrained.eval().forward_selection(x)['indices'], cells)

    main([
        '--teacher', TEACHER, '--teacher-checkpoint', str(tmp_path / 'teacher.pth'), '--teacher-kwargs', *TINY_KWARGS,
        '--model-kwargs', *TINY_MODEL_KWARGS, '--img-size', '112', '--data-dir', str(tmp_path / 'images'),
        '--no-aug', '--batch-size', '16', '--steps', '80', '--warmup-steps', '10', '--lr', '2e-3',
        '--log-every', '20', '--workers', '0', '--output', str(tmp_path / 'run'),
    ])
    model = timm.create_model('lookwhere_vitb_518', pretrained=True, k=k, pretrained_cfg_overlay=dict(
        file=str(tmp_path / 'run' / 'last.pth')), **TINY).eval()
    with torch.no_grad():
        after = region_coverage(model.forward_selection(x)['indices'], cells)
    # measured here: 0.84 after 80 steps (0.81-0.84 with seeds 1-3), 0.07 before; chance 0.0625
    print(f'region coverage of the top-{k}: {before:.3f} before, {after:.3f} after, chance {chance:.4f}')
    assert before < 4 * chance, before
    assert after > 0.6, (before, after)

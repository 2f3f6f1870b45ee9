#!/usr/bin/env python3
""" From files to answers: does the whole path, decoding included, cost what the model looks at?

A folder of JPEGs (quality 90) made from the generated sign scenes, 0.3 to 12 MP, about a third above 8 MP, read
image by image at its own size, through five pipelines side by side (their turns alternate, so a slower machine
slows all alike), for the shipped 512 px sign model (k = 5%) and `lookwhere_vitb_518` (k = 256, random weights:
the timing does not depend on them):

    predict     `lookwhere predict`'s path: torchvision decodes into uint8 in DataLoader workers, the model
                normalises only its low-res copy and the k patches (timm_lookwhere.images + predict.Predictor)
    float       today's float pipeline: Pillow decodes, `create_native_transform` makes the whole frame
                normalised floats (ToTensor + Normalize), the model takes the list
    timm        timm's inference.py: every image resized and centre-cropped to the full-res ViT's size
                (timm's eval transform), the ViT sees every patch
    decode      the limit of the input side: the predict path's decoding alone
    model       the limit of the model side: the model alone on the decoded uint8 images, already in memory

Each pipeline's images/s end to end, on one process with two torch threads and two DataLoader workers (torch's
and predict's defaults on two cores: decoding and the model overlap), and the share of its time in decoding,
pre-processing and the model (each step timed alone, image by image). The sign model is timed again on the frames
of 2 MP and more alone, the photos and 4K frames where a whole-frame float copy costs most. Then `lookwhere predict`
itself as a command: one process of one thread against two under torchrun (one thread each, decoding in the
process, the two taking turns), and its peak resident memory over 64 and 512 files.

    python benchmarks/pipeline.py                      # about 35 min on 2 cores; results in benchmarks/results
    python benchmarks/pipeline.py --tiny               # a quick check of the script, numbers meaningless
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import timm
from timm.data import create_transform, resolve_data_config

import timm_lookwhere
from timm_lookwhere.images import read_image
from timm_lookwhere.native_size import collate_native, create_native_transform
from timm_lookwhere.predict import Predictor, create_model
from timm_lookwhere.scenes import WIDE_AREA_RANGE, generate_scene

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import save_results  # noqa: E402  (the benchmarks' own helper, beside this script)

RESULTS = Path(__file__).resolve().parent / 'results'
# (width, height) of the folder's images, 0.3 to 12 MP: phone photos, frames, scans; a third above 8 MP
SIZES = [(640, 480), (1024, 768), (1280, 720), (1600, 1200), (1920, 1080), (2048, 1536), (2560, 1440),
         (3024, 3024), (3264, 2448), (3840, 2160), (4000, 3000), (3000, 4000)]
MODELS = {
    'sign': dict(name='lookwhere_vitt16_512.sparse_signs', pretrained=True, k_ratio=0.05,
                 label='shipped sign model, k = 5%'),
    # the frames the target names: phone photos and 4K frames, where a whole-frame float copy costs most
    'sign_2mp': dict(name='lookwhere_vitt16_512.sparse_signs', pretrained=True, k_ratio=0.05, min_megapixels=2.0,
                     label='shipped sign model, k = 5%, frames of 2 MP and more'),
    # 5% of a 12 MP frame's own patches is 2350 tokens: k = 256 is the model at a fixed budget, what it costs on
    # its own 512 px scenes whatever the frame
    'sign_k256': dict(name='lookwhere_vitt16_512.sparse_signs', pretrained=True, k=256,
                      label='shipped sign model, k = 256'),
    'vitb': dict(name='lookwhere_vitb_518', pretrained=False, k=256, num_classes=1000,  # an ImageNet-sized head
                 label='lookwhere_vitb_518, k = 256'),
}


# --------------------------------------------------------------------------------------------
# the folder


def make_folder(folder: Path, count: int, tiny: bool) -> List[str]:
    """`count` JPEGs (q90) of generated scenes at the sizes of SIZES in turn (a scene drawn at 1024 px, resized to
    the size: what matters here is the pixel count); made once, then found."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        if tiny:
            width, height = width // 8, height // 8
        path = folder / f'scene_{i:03d}_{width}x{height}.jpg'
        if not path.exists():
            scene = generate_scene(1000 + i, 'test', 0, img_size=1024, area_range=WIDE_AREA_RANGE).image
            scene.convert('RGB').resize((width, height), Image.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    return paths


def megapixels(paths: Sequence[str]) -> List[float]:
    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(image.width * image.height / 1e6)
    return out


# --------------------------------------------------------------------------------------------
# the pipelines


class Decoded(Dataset):
    """The predict path's input side: torchvision decoding to uint8, then the predictor's (uint8) preparation."""

    def __init__(self, paths: Sequence[str], prepare: Callable[[torch.Tensor], torch.Tensor]):
        self.paths, self.prepare = paths, prepare

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.prepare(read_image(self.paths[i]))


class Transformed(Dataset):
    """timm's input side: Pillow decoding, then a transform of the whole image (to normalised floats)."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert('RGB')), 0


def loader(dataset: Dataset, batch_size: int, workers: int, collate: Callable) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def pipelines(spec: Dict[str, Any], args: argparse.Namespace) -> Tuple[Dict[str, Callable], Dict[str, Any]]:
    """name -> a call that runs that pipeline once over the files it is given; and the parts they are made of."""
    kwargs = dict(k=spec.get('k'), k_ratio=spec.get('k_ratio'))
    if spec.get('num_classes'):
        kwargs['num_classes'] = spec['num_classes']
    predictor = Predictor(create_model(spec['name'], spec['pretrained'], **kwargs))
    model = predictor.model
    float_transform = create_native_transform(model)
    vit = timm_lookwhere.create_teacher(spec['name'], pretrained=False) if spec['name'].endswith('sparse_signs') \
        else timm.create_model('vit_base_patch14_reg4_dinov2', pretrained=False)
    vit.eval()
    # its own size (the sign teacher's pretrained cfg is its architecture's, 518 px)
    vit_transform = create_transform(**resolve_data_config(dict(input_size=(3, *vit.patch_embed.img_size)), model=vit))
    batch, workers = args.batch_size, args.workers
    in_memory: Dict[str, torch.Tensor] = {}

    def run_predict(paths):
        for images in loader(Decoded(paths, predictor.prepare), batch, workers, list):
            predictor.predict(images)

    @torch.no_grad()
    def run_float(paths):
        for images, _ in loader(Transformed(paths, float_transform), batch, workers, collate_native):
            model(images).softmax(-1)

    @torch.no_grad()
    def run_timm(paths):
        for images, _ in loader(Transformed(paths, vit_transform), batch, workers, None):
            vit(images).softmax(-1)

    def run_decode(paths):
        for _ in loader(Decoded(paths, lambda image: image), batch, workers, list):
            pass

    def hold_in_memory(paths):  # before the model's turns: decoding is not its time
        for path in paths:
            if path not in in_memory:
                in_memory[path] = predictor.prepare(read_image(path))

    def run_model(paths):
        hold_in_memory(paths)
        images = [in_memory[path] for path in paths]
        for start in range(0, len(images), batch):
            predictor.predict(images[start:start + batch])

    return dict(predict=run_predict, float=run_float, timm=run_timm, decode=run_decode, model=run_model), dict(
        predictor=predictor, model=model, float_transform=float_transform, vit=vit, vit_transform=vit_transform,
        hold_in_memory=hold_in_memory)


def timed_in_turns(calls: Dict[str, Callable], files: Dict[str, Sequence[str]], repeats: int) -> Dict[str, List[float]]:
    """Seconds per file of each call over its `files`, the calls taking turns, after a warm-up on two files."""
    for name, call in calls.items():
        call(files[name][:2])
    seconds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call(files[name])
            seconds[name].append((time.perf_counter() - start) / len(files[name]))
    return seconds


@torch.no_grad()
def step_shares(parts: Dict[str, Any], paths: Sequence[str], batch: int) -> Dict[str, Dict[str, float]]:
    """Seconds per image of each step of each pipeline, timed alone on this thread: decoding, pre-processing (what
    happens between the decoded pixels and the model) and the model."""
    predictor, model, vit = parts['predictor'], parts['model'], parts['vit']
    steps = {name: dict(decode=0., preprocess=0., model=0.) for name in ('predict', 'float', 'timm')}
    decoded, floats, vit_inputs = [], [], []
    for path in paths:
        start = time.perf_counter()
        image = read_image(path)
        middle = time.perf_counter()
        decoded.append(predictor.prepare(image))
        steps['predict']['decode'] += middle - start
        steps['predict']['preprocess'] += time.perf_counter() - middle
        for name, transform, out in (('float', parts['float_transform'], floats),
                                     ('timm', parts['vit_transform'], vit_inputs)):
            start = time.perf_counter()
            with Image.open(path) as pil:
                pil = pil.convert('RGB')
                middle = time.perf_counter()
                out.append(transform(pil))
            steps[name]['decode'] += middle - start
            steps[name]['preprocess'] += time.perf_counter() - middle
    for start in range(0, len(paths), batch):
        for name, call in (('predict', lambda: predictor.predict(decoded[start:start + batch])),
                           ('float', lambda: model(floats[start:start + batch])),
                           ('timm', lambda: vit(torch.stack(vit_inputs[start:start + batch])))):
            begin = time.perf_counter()
            call()
            steps[name]['model'] += time.perf_counter() - begin
    return {name: {step: value / len(paths) for step, value in parts_.items()} for name, parts_ in steps.items()}


# --------------------------------------------------------------------------------------------
# lookwhere predict, the command


def command_seconds(spec: Dict[str, Any], inputs: str, processes: int, workers: int, tiny: bool) -> Dict[str, Any]:
    """`lookwhere predict` on `inputs`, one thread a process: the wall time of the whole command, and the seconds
    and peak resident memory of its processes (their own and their loader workers' largest)."""
    output = tempfile.mkdtemp(prefix='pipeline_predict_')
    budget = ['--k', str(spec['k'])] if spec.get('k') else ['--k-ratio', str(spec['k_ratio'])]
    predict = ['-m', 'timm_lookwhere', 'predict', inputs, '--model', spec['name'], *budget, '--output', output,
               '--quiet', '--threads', '1', '--workers', str(workers), '--batch-size', '4']
    if not spec['pretrained']:
        predict.append('--no-pretrained')
    if spec.get('num_classes'):
        predict += ['--model-kwargs', f"num_classes={spec['num_classes']}"]
    if processes > 1:
        command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', str(processes),
                   *predict]
    else:
        command = [sys.executable, *predict]
    # a fresh process measures: its children's peak is then the command's own
    probe = ('import resource, subprocess, sys, time; start = time.perf_counter(); '
             f'code = subprocess.run({command!r}, stdout=subprocess.DEVNULL).returncode; '
             'print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    wall, peak_kib, code = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True, text=True,
                                          check=True).stdout.split()
    if int(code):
        raise RuntimeError(f'lookwhere predict failed (exit {code}): {" ".join(command)}')
    with open(os.path.join(output, 'manifest.json')) as f:
        manifest = json.load(f)
    shutil.rmtree(output)
    return dict(wall_s=float(wall), peak_mb=int(peak_kib) / 1024, images=manifest['counts']['predicted']
                if 'counts' in manifest else None)


def many_files(paths: Sequence[str], folder: Path, count: int) -> str:
    """A folder of `count` names for the images of `paths` in turn (hard links: no more disk), for the memory
    measurement."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        link = folder / f'{i:04d}_{os.path.basename(paths[i % len(paths)])}'
        if not link.exists():
            os.link(paths[i % len(paths)], link)
    return str(folder)


# --------------------------------------------------------------------------------------------
# run and report


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    paths = make_folder(work / 'images', args.images, args.tiny)
    sizes = megapixels(paths)
    results: Dict[str, Any] = dict(
        images=len(paths), megapixels=dict(min=min(sizes), max=max(sizes), mean=statistics.mean(sizes),
                                           above_8=sum(s > 8 for s in sizes)),
        batch_size=args.batch_size, workers=args.workers, threads=args.threads, repeats=args.repeats, models={},
        machine=dict(processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                     torch=torch.__version__, timm=timm.__version__), command=' '.join(sys.argv))
    for key in args.models:
        spec = MODELS[key]
        print(f'== {spec["label"]}', flush=True)
        calls, parts = pipelines(spec, args)
        model_paths = [path for path, size in zip(paths, sizes) if size >= spec.get('min_megapixels', 0)]
        # the full-res ViT-B at 518 px takes seconds an image on a CPU: it reads the first files (every size once)
        files = {name: paths[:args.slow_images] if key == 'vitb' and name == 'timm' else model_paths
                 for name in calls}
        parts['hold_in_memory'](files['model'])
        seconds = timed_in_turns(calls, files, args.repeats)
        rows = {name: dict(seconds_per_image=statistics.median(values), runs=values, images=len(files[name]),
                           images_per_s=1 / statistics.median(values)) for name, values in seconds.items()}
        ratios = {name: [p / q for p, q in zip(seconds[name], seconds['predict'])] for name in seconds}
        for name, row in rows.items():
            row['predict_speedup'] = statistics.median(ratios[name])  # predict's speed over this one's, paired
        shares = step_shares(parts, paths[:args.slow_images] if key == 'vitb' else model_paths, args.batch_size)
        limits = rows['decode']['seconds_per_image'] + rows['model']['seconds_per_image']
        results['models'][key] = dict(
            label=spec['label'], rows=rows, steps=shares,
            targets=dict(predict_over_float=rows['float']['predict_speedup'],
                         predict_per_image_over_limits=rows['predict']['seconds_per_image'] / limits,
                         # what no input path can pass: the float pipeline against the model alone
                         model_alone_over_float=(rows['float']['seconds_per_image']
                                                 / rows['model']['seconds_per_image'])))
        print(json.dumps({n: round(r['images_per_s'], 2) for n, r in rows.items()}), flush=True)
    sign, folders = MODELS['sign'], {len(paths): str(work / 'images')}
    folders[args.many] = many_files(paths, work / f'many_{args.many}', args.many)
    print('== lookwhere predict, the command', flush=True)
    # one and two processes take turns, `repeats` times: a slower spell of the machine falls on both
    turns = {processes: {files: [] for files in folders} for processes in (1, 2)}
    for _ in range(args.repeats):
        for files, folder in folders.items():
            for processes in (1, 2):
                turns[processes][files].append(command_seconds(sign, folder, processes, 0, args.tiny))
    few, many = sorted(folders)

    def wall(processes, files, turn):
        return turns[processes][files][turn]['wall_s']

    def steady(processes, turn):  # seconds a file once started: the difference of the two runs
        return (wall(processes, many, turn) - wall(processes, few, turn)) / (many - few)
    runs = {str(p): {str(f): dict(wall_s=statistics.median(r['wall_s'] for r in by[f]), turns=by[f]) for f in by}
            for p, by in turns.items()}
    results['torchrun'] = dict(
        runs=runs, files=many,
        speedup=statistics.median(wall(1, many, t) / wall(2, many, t) for t in range(args.repeats)),
        steady_speedup=statistics.median(steady(1, t) / steady(2, t) for t in range(args.repeats)))
    results['memory'] = {str(files): command_seconds(sign, folder, 1, args.workers, args.tiny)
                         for files, folder in folders.items()}
    return results


def to_markdown(results: Dict[str, Any]) -> str:
    mp = results['megapixels']
    lines = [f"{results['images']} JPEGs (q90) of {mp['min']:.1f} to {mp['max']:.1f} MP (mean {mp['mean']:.1f}, "
             f"{mp['above_8']} above 8 MP), each at its own size; one process, {results['threads']} torch "
             f"thread(s), {results['workers']} DataLoader worker(s), batches of {results['batch_size']}; median of "
             f"{results['repeats']} turns. Machine: {results['machine']['processor']}, "
             f"{results['machine']['cpu_count']} cores, torch {results['machine']['torch']}.", '']
    names = dict(predict='`lookwhere predict` (uint8 to the model)', float='float pipeline (create_native_transform)',
                 timm="timm's inference.py (full-res ViT, resized)", decode='decode alone (limit)',
                 model='model alone, images in memory (limit)')
    for model in results['models'].values():
        lines += [f"**{model['label']}**", '',
                  '| pipeline | images/s | ms / image | `predict` is faster by | decode | pre-processing | model |',
                  '|---|---|---|---|---|---|---|']
        for name, row in model['rows'].items():
            steps = model['steps'].get(name)
            if steps:
                total = sum(steps.values())
                shares = ' | '.join(f'{100 * steps[s] / total:.0f}% ({1000 * steps[s]:.0f} ms)'
                                    for s in ('decode', 'preprocess', 'model'))
            else:
                shares = '- | - | -'
            ms = 1000 * row['seconds_per_image']
            files = f" ({row['images']} files)" if row['images'] != results['images'] else ''
            lines.append(f"| {names[name]}{files} | {row['images_per_s']:.2f} | {ms:.0f} "
                         f"| {row['predict_speedup']:.2f}x | {shares} |")
        targets = model['targets']
        lines += ['', f"`predict` over the float pipeline: **{targets['predict_over_float']:.2f}x**; its time per "
                      f"image over decode alone + model alone: **{targets['predict_per_image_over_limits']:.2f}x**; "
                      f"the model alone over the float pipeline (the bound of any input path): "
                      f"{targets['model_alone_over_float']:.2f}x.",
                  '']
    torchrun = results['torchrun']
    one, two = (torchrun['runs'][p][str(torchrun['files'])]['wall_s'] for p in ('1', '2'))
    lines += [f"`lookwhere predict` as a command, the sign model, one torch thread a process, decoding in the process "
              f"(no loader workers), the two taking turns, medians of {results['repeats']}: {torchrun['files']} "
              f"files in {one:.1f} s on one process, {two:.1f} s on two under torchrun, "
              f"**{torchrun['speedup']:.2f}x** with start-up; once started (the difference of the runs on "
              f"{results['images']} and {torchrun['files']} files), **{torchrun['steady_speedup']:.2f}x**.", '',
              f"Memory: `lookwhere predict` with {results['workers']} loader worker(s), the largest process's peak "
              "resident memory:", '', '| files | peak resident memory (MB) | wall time (s) |', '|---|---|---|']
    for files, row in results['memory'].items():
        lines.append(f"| {files} | {row['peak_mb']:.0f} | {row['wall_s']:.1f} |")
    return '\n'.join(lines)


LEGEND = dict(predict='lookwhere predict', float='float pipeline', timm="timm's inference.py (ViT, resized)",
              decode='decode alone', model='model alone')


def plot(results: Dict[str, Any], path: Path) -> None:
    """Images/s of each pipeline, a group per model."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    models = list(results['models'].values())
    names = list(models[0]['rows'])
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=120)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [m['rows'][name]['images_per_s'] for m in models]
        bars = ax.bar([j + i * width for j in range(len(models))], values, width, label=LEGEND[name])
        ax.bar_label(bars, fmt='%.1f', fontsize=7)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(models))],
                  [textwrap.fill(m['label'], 24) for m in models], fontsize=8)
    ax.set_ylabel('images / s, end to end (higher is better)')
    ax.set_title(f"From JPEG files (0.3-12 MP) to answers: one process, {results['threads']} thread(s), "
                 f"{results['workers']} loader worker(s)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=64, help='JPEGs in the folder (default: %(default)s)')
    parser.add_argument('--many', type=int, default=512, help='files of the larger memory run (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=4, help='images a model call (default: %(default)s)')
    parser.add_argument('--slow-images', type=int, default=16,
                        help="the files the full-res ViT-B and the steps' timing of lookwhere_vitb_518 read "
                             '(default: %(default)s: every size at least once)')
    parser.add_argument('--workers', type=int, default=2,
                        help="DataLoader workers (default: %(default)s, predict's default here: one a core)")
    parser.add_argument('--threads', type=int, default=2,
                        help="torch threads of the process (default: %(default)s, torch's default here)")
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS),
                        help='the models to time (default: all)')
    parser.add_argument('--name', default='pipeline', help='results file names, NAME.{json,md,png} (default: pipeline)')
    parser.add_argument('--repeats', type=int, default=3, help='timed turns of every pipeline (default: %(default)s)')
    parser.add_argument('--work', default=os.path.join(tempfile.gettempdir(), 'lookwhere_pipeline'),
                        help='where the folder of images is made (and kept)')
    parser.add_argument('--out', default=str(RESULTS), help='where pipeline.{json,md,png} go')
    parser.add_argument('--tiny', action='store_true', help='small images, few files: checks the script only')
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.many, args.repeats, args.slow_images = 6, 12, 1, 4
        for key in ('vitb', 'sign_k256'):  # the small images have fewer than 256 patches
            MODELS[key] = dict(MODELS[key], k=None, k_ratio=0.1)
        MODELS['sign_2mp'] = dict(MODELS['sign_2mp'], min_megapixels=2.0 / 64)  # sides an eighth
        args.work = os.path.join(args.work, 'tiny')
        args.out = os.path.join(args.work, 'results')
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    results = run(args)
    out = Path(args.out)
    save_results(results, out, args.name, to_markdown, plot)
    return results


if __name__ == '__main__':
    main()

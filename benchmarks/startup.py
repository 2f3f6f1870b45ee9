"""What installing timm-lookwhere costs every Python process: `python -c pass`, before and after.

Builds the wheel and the editable wheel of this checkout, installs each with pip (no dependencies:
the start-up hook must not need torch or timm) into its own fresh venv beside a bare one and an
editable install without the hook's .pth file, then times `python -c pass` in each, interleaved so
that load on the machine hits them alike.

    python benchmarks/startup.py --runs 300 [--out benchmarks/results/startup.json]
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOK_MODULE = '_timm_lookwhere_autoload'
PTH_NAME = 'timm_lookwhere-autoload.pth'


def build(kind: str, tmp: Path) -> Path:
    """Build from a copy of the checkout so that nothing is written into it."""
    project = tmp / f'project-{kind}'
    project.mkdir()
    for name in ('pyproject.toml', 'setup.py', 'setup.cfg', 'README.md', f'{HOOK_MODULE}.py'):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / 'timm_lookwhere', project / 'timm_lookwhere', ignore=shutil.ignore_patterns('__pycache__'))
    script = f'from setuptools import build_meta; print(build_meta.build_{kind}({str(tmp / "dist")!r}))'
    out = subprocess.run([sys.executable, '-c', script], cwd=project, check=True, capture_output=True, text=True)
    return tmp / 'dist' / out.stdout.split()[-1]


def make_venv(path: Path, wheel: Path = None) -> Path:
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(path)], check=True)
    python = path / 'bin' / 'python'
    if wheel is not None:  # pip installs for the venv's interpreter, byte-compiling as usual
        subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '-q',
                        str(wheel)], check=True)
    return python


def start_once(python: Path, env: dict) -> tuple:
    """Wall and CPU (user + system) milliseconds of one `python -c pass`; CPU time barely moves
    with the load of a shared machine, wall time does."""
    start = time.perf_counter()
    process = subprocess.Popen([str(python), '-c', 'pass'], env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = (time.perf_counter() - start) * 1e3
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f'{python} -c pass exited with {process.returncode}')
    return wall, (usage.ru_utime + usage.ru_stime) * 1e3


def time_start_up(pythons: dict, runs: int, env: dict) -> tuple:
    wall = {name: [] for name in pythons}
    cpu = {name: [] for name in pythons}
    for name, python in pythons.items():  # warm-up: file caches, .pyc files of editable installs
        for _ in range(5):
            start_once(python, env)
    order = list(pythons)
    for _ in range(runs):
        random.shuffle(order)
        for name in order:
            w, c = start_once(pythons[name], env)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def hook_import_time(python: Path, runs: int, env: dict) -> float:
    """Median self time (ms) of the hook module's import, from `python -X importtime`."""
    samples = []
    for _ in range(runs):
        err = subprocess.run([str(python), '-X', 'importtime', '-c', 'pass'], env=env, check=True,
                             capture_output=True, text=True).stderr
        line = next(ln for ln in err.splitlines() if ln.rstrip().endswith(HOOK_MODULE))
        samples.append(int(line.split('|')[1]) / 1e3)
    return statistics.median(samples)


def summary(samples: list, base: list) -> dict:
    # the difference of medians, with a bootstrap 95% interval
    rng = random.Random(0)
    diffs = sorted(
        statistics.median(rng.choices(samples, k=len(samples))) - statistics.median(rng.choices(base, k=len(base)))
        for _ in range(2000))
    return dict(median_ms=statistics.median(samples), mean_ms=statistics.fmean(samples),
                stdev_ms=statistics.stdev(samples), median_diff_ms=statistics.median(samples) - statistics.median(base),
                median_diff_ci95_ms=(diffs[50], diffs[1949]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', type=int, default=300, help='timed starts per venv')
    parser.add_argument('--out', type=Path, default=None, help='write the results as JSON here')
    parser.add_argument('--no-bytecode', action='store_true',
                        help='keep PYTHONDONTWRITEBYTECODE as set (default: unset it, as most users have it)')
    args = parser.parse_args()
    env = dict(os.environ)
    if not args.no_bytecode:
        env.pop('PYTHONDONTWRITEBYTECODE', None)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        editable = build('editable', tmp)
        pythons = {
            'bare': make_venv(tmp / 'bare'),
            'pip install': make_venv(tmp / 'wheel', build('wheel', tmp)),
            'pip install -e': make_venv(tmp / 'editable', editable),
            # setuptools' own editable finder, which any -e install of this flat layout has
            '-e without hook': make_venv(tmp / 'editable-no-hook', editable),
        }
        for pth in (tmp / 'editable-no-hook').glob(f'lib/python*/site-packages/{PTH_NAME}'):
            pth.unlink()
        wall, cpu = time_start_up(pythons, args.runs, env)
        results = {name: dict(wall=summary(wall[name], wall['bare']), cpu=summary(cpu[name], cpu['bare']))
                   for name in pythons}
        for name in ('pip install', 'pip install -e'):
            results[name]['hook_import_self_ms'] = hook_import_time(pythons[name], 50, env)

    results['_setup'] = dict(python=sys.version.split()[0], runs=args.runs, cpus=os.cpu_count(),
                             bytecode_written=not args.no_bytecode)
    print(f'{"python -c pass":16s} {"":5s} {"median":>8s} {"mean":>8s} {"stdev":>8s} '
          f'{"median vs bare (95% CI)":>30s} {"hook import":>12s}')
    for name, r in results.items():
        if name.startswith('_'):
            continue
        for clock in ('wall', 'cpu'):
            t = r[clock]
            lo, hi = t['median_diff_ci95_ms']
            hook = f'{r["hook_import_self_ms"]:.2f} ms' if 'hook_import_self_ms' in r and clock == 'wall' else ''
            print(f'{name if clock == "wall" else "":16s} {clock:5s} {t["median_ms"]:6.2f}ms {t["mean_ms"]:6.2f}ms '
                  f'{t["stdev_ms"]:6.2f}ms {t["median_diff_ms"]:+9.2f} ms [{lo:+.2f}, {hi:+.2f}] {hook:>12s}')
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()

"""`lookwhere` command line: each sub-command lives in its own module, which provides
`add_subcommand(subparsers)` and sets `func` (called with the parsed args) on its parser."""
import argparse
import importlib
import sys
from typing import List, Optional

# Modules that contribute sub-commands, in the order `lookwhere --help` lists them.
SUBCOMMAND_MODULES: List[str] = [
    'timm_lookwhere.distill', 'timm_lookwhere.export', 'timm_lookwhere.demo', 'timm_lookwhere.predict']


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (runs, threads, steps): 0 or less is refused by name."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def non_negative_int(text: str) -> int:
    """argparse type of an index or seed: below 0 is refused."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be 0 or more, got {value}')
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='lookwhere', description='LookWhere models for timm.')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommand(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, 'func', None) is None:
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == '__main__':
    sys.exit(main())

"""The `vqtok` command line: each subcommand parses its flags and calls one library function.

Subcommands are registered in ``_COMMANDS`` as (name, help, add_arguments, run); heavy imports
happen inside ``run`` so `vqtok --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _info_run(args: argparse.Namespace) -> int:
    import platform

    import torch

    import vqtok
    from vqtok.ops import _native, available_backends
    from vqtok.ops.dispatch import unavailable_reason

    info = {
        "vqtok": vqtok.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.is_available(),
        "backends": available_backends(),
        "unavailable": {b: unavailable_reason(b) for b in ("cpp", "cuda", "triton") if unavailable_reason(b)},
        "extension": _native.build_info(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:12s} {v}")
    return 0


_COMMANDS: list[tuple[str, str, Callable, Callable]] = [
    ("info", "show the version, the available backends and how the extension was built", _info_args, _info_run),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqtok", description="Train, evaluate and export discrete tokenizers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_, add_args, run in _COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

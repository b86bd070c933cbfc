"""The `vqtok` command line: each subcommand parses its flags and calls one library function.

Subcommands are registered in ``_COMMANDS`` as (name, help, add_arguments, run); heavy imports
happen inside ``run`` so `vqtok --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
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


# --------------------------------------------------------------------------------------------
# encode / decode / verify (token export: vqtok.export)
# --------------------------------------------------------------------------------------------
def _fail(command: str, err: Exception) -> int:
    print(f"vqtok {command}: error: {err}", file=sys.stderr)
    return 1


def _encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint dir or saved tokenizer folder")
    p.add_argument("--input", required=True, help="builtin:images | builtin:video | builtin:audio, or a data folder")
    p.add_argument("--output", required=True, help="token folder to write (re-run the same command to resume)")
    p.add_argument("--format", default="npy", choices=["npy", "wds", "bin"],
                   help="shard layout: .npy arrays, WebDataset .tar, or a flat .bin stream + offsets (default npy)")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard (default 1024)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    p.add_argument("--split", default="train", choices=["train", "eval"],
                   help="split of a builtin: set (default train); a folder is encoded whole")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N samples")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available, per rank)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")


def _encode_run(args: argparse.Namespace) -> int:
    from vqtok.checkpoint import CheckpointError
    from vqtok.export import encode_dataset

    try:
        m = encode_dataset(args.checkpoint, args.input, args.output, layout=args.format, shard_size=args.shard_size,
                           batch_size=args.batch_size, split=args.split, limit=args.limit, device=args.device,
                           num_workers=args.num_workers)
    except (OSError, ValueError, CheckpointError) as e:
        return _fail("encode", e)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {m['num_samples']} samples x {m['grid']} {m['dtype']} tokens in {len(m['shards'])} "
              f"{m['layout']} shards to {args.output}")
    return 0


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="the tokenizer that encoded the tokens")
    p.add_argument("--tokens", required=True, help="token folder written by `vqtok encode`")
    p.add_argument("--output", required=True, help="folder for PNG images, frame folders or WAV files")
    p.add_argument("--limit", type=int, default=None, help="decode only the first N samples")
    p.add_argument("--batch-size", type=int, default=8, help="samples per decoder pass (default 8)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")


def _decode_run(args: argparse.Namespace) -> int:
    from vqtok.checkpoint import CheckpointError
    from vqtok.export import decode_tokens

    try:
        paths = decode_tokens(args.checkpoint, args.tokens, args.output, limit=args.limit,
                              batch_size=args.batch_size, device=args.device)
    except (OSError, ValueError, CheckpointError) as e:
        return _fail("decode", e)
    print(f"wrote {len(paths)} samples to {args.output}")
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("tokens", help="token folder written by `vqtok encode`")
    p.add_argument("--checkpoint", default=None, help="also check that this tokenizer made the tokens")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _verify_run(args: argparse.Namespace) -> int:
    from vqtok.checkpoint import CheckpointError
    from vqtok.export import verify_export

    try:
        summary = verify_export(args.tokens, args.checkpoint, progress=not args.json)
    except (OSError, ValueError, CheckpointError) as e:
        return _fail("verify", e)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"OK {summary['root']}: {summary['samples']} samples x {summary['grid']} {summary['dtype']} in "
              f"{summary['shards']} {summary['layout']} shards ({summary['bytes']} bytes), every sha256 matches")
    return 0


# --------------------------------------------------------------------------------------------
# eval / report (vqtok.evaluate, vqtok.report)
# --------------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint dir to evaluate")
    p.add_argument("--data", default=None, help="a data folder to evaluate whole (default: the run's held-out split)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/eval, or CHECKPOINT/eval)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate at most N samples (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS (needs torchvision backbone weights)")
    p.add_argument("--no-fid", action="store_true", help="skip rFID (needs the FID Inception-v3 weights)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--json", action="store_true", help="print metrics.json to stdout")


def _eval_run(args: argparse.Namespace) -> int:
    from vqtok.evaluate import evaluate_checkpoint

    try:
        metrics, page = evaluate_checkpoint(args.checkpoint, data=args.data, out=args.out,
                                            max_samples=args.max_samples, batch_size=args.batch_size,
                                            lpips=not args.no_lpips, fid=not args.no_fid, device=args.device)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: vqtok.checkpoint.CheckpointError
        return _fail("eval", e)
    if page is None:  # a torchrun rank other than 0: rank 0 prints and writes the report
        return 0
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for key in ("samples", "usage", "perplexity", "dead_codes", "collapse", "psnr", "ssim", "lpips", "rfid"):
            if key in metrics:
                print(f"{key:12s} {metrics[key]}")
        for name, why in metrics.get("unavailable", {}).items():
            print(f"{name:12s} unavailable: {why['reason']}" + (f" (provide {why['path']})" if why.get("path") else ""))
    print(f"report: {page}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (reads RUN/eval/metrics.json and RUN/metrics.jsonl) or an eval folder")


def _report_run(args: argparse.Namespace) -> int:
    from vqtok.report import rebuild_report_from

    try:
        page = rebuild_report_from(args.run)
    except (OSError, ValueError) as e:
        return _fail("report", e)
    print(f"report: {page}")
    return 0


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="named preset: demo, image-f8, image-f16, video, audio")
    p.add_argument("--config", default=None, metavar="YAML", help="YAML file with model/quantizer/data/train/loss sections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=200 (repeatable; values parsed as YAML)")
    p.add_argument("--out", default=None, metavar="RUN", help="run folder (default: runs/<preset or 'custom'>-<date>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _train_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vqtok.checkpoint import CheckpointError
    from vqtok.config import ConfigError, load_config
    from vqtok.losses import MissingWeightsError
    from vqtok.train import train

    if args.resume and not args.out:
        return _fail("train", ValueError("--resume needs --out RUN (the run folder to continue)"))
    stamp = __import__("time").strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or os.path.join("runs", f"{args.preset or 'custom'}-{stamp}"))
    base = None
    if args.resume:
        if not (out / "config.json").is_file():
            return _fail("train", FileNotFoundError(f"--resume: {out / 'config.json'} not found (no run to resume)"))
        base = json.loads((out / "config.json").read_text())
    try:
        cfg = load_config(None if base else args.preset, args.config, args.overrides, base=base)
        result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, MissingWeightsError, CheckpointError, FileExistsError) as e:
        return _fail("train", e)
    if result:
        print(f"held-out ({result.get('samples', 0)} samples): usage {result.get('usage', float('nan')):.4f}  "
              f"perplexity {result.get('perplexity', float('nan')):.1f}  psnr {result.get('psnr', float('nan')):.2f} dB"
              + (f"  ssim {result['ssim']:.4f}" if "ssim" in result else ""))
        print(f"checkpoint: {result['checkpoint']}")
    return 0


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default=None,
                   help="comma-separated suites to run (default: all): elementwise, nearest, entropy, modules, gpu")
    p.add_argument("--quick", action="store_true", help="smaller grids and fewer repetitions (about a minute)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long smoke sizes, for tests
    p.add_argument("--json", default=None, metavar="PATH", help="write rows and machine info as JSON here")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of nearest-code time vs K per D here (when the nearest suite ran)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for bench.json, bench.txt and nearest.png (unless --json/--plot say otherwise)")


def _bench_run(args: argparse.Namespace) -> int:
    from vqtok.bench import run_bench

    try:
        results = run_bench(args.suite, quick=args.quick, tiny=args.tiny, json_path=args.json,
                            plot_path=args.plot, out_dir=args.out)
    except ValueError as e:
        print(f"vqtok bench: {e}", file=sys.stderr)
        return 2
    return 1 if any(s["status"] == "error" for s in results["suites"].values()) else 0


_COMMANDS: list[tuple[str, str, Callable, Callable]] = [
    ("info", "show the version, the available backends and how the extension was built", _info_args, _info_run),
    ("train", "train an image/video/audio tokenizer (presets, YAML, --set; --resume; torchrun for DDP)", _train_args,
     _train_run),
    ("encode", "encode a dataset into token shards (resumable; torchrun for several processes)", _encode_args,
     _encode_run),
    ("decode", "decode token shards back to images, frame folders or WAV files", _decode_args, _decode_run),
    ("verify", "check a token folder's shards (size, sha256, shape, ids) against its manifest", _verify_args,
     _verify_run),
    ("eval", "evaluate a tokenizer: codebook health, PSNR/SSIM/LPIPS/rFID, metrics.json + HTML report",
     _eval_args, _eval_run),
    ("report", "rebuild the HTML report of a run folder from its eval results and training log", _report_args,
     _report_run),
    ("bench", "run benchmark suites: tables, JSON with machine info, nearest-code plot", _bench_args, _bench_run),
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

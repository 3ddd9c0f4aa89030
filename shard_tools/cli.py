"""``lc-shard``: pack, verify and describe shard folders.

Exit status 0 on success, 2 on bad input (one line ``error: <message>`` on stderr).
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures.process import BrokenProcessPool

from lc_common.errors import INTERRUPTED, InputError, OneLineArgumentParser, WriteError, ended_as_told, print_error


def _parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="lc-shard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    pack = sub.add_parser("pack", help="pack the challenge's TIFF tiles into fold-pure shards")
    pack.add_argument("--src", required=True, help="challenge folder (train/images, train/masks, test/images)")
    pack.add_argument("--out", required=True, help="shard folder to create")
    pack.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    pack.add_argument("--seed", type=int, default=0, help="fold assignment seed (default 0)")
    pack.add_argument("--block-size", default="auto", metavar="N|auto",
                      help="train tiles of consecutive ids that go to one fold together, so that a fold holds "
                           "out regions (1: tile by tile; default auto: 500, fewer for a small set)")
    size = pack.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="samples per shard")
    size.add_argument("--shard-size", type=float, metavar="MB", help="shard size in MB (default 100)")
    pack.add_argument("--workers", type=int, help="reader processes (default: CPUs, at most 16)")
    pack.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty folder")

    verify = sub.add_parser("verify", help="re-hash and decode every shard against the manifest")
    verify.add_argument("root", help="shard folder")
    describe = sub.add_parser("describe", help="folds, counts, class distribution, channel statistics")
    describe.add_argument("root", help="shard folder")
    return parser


def _run(args) -> None:
    # Imported here: `pack` pulls in webdataset (and torch); verify/describe start faster without.
    if args.command == "pack":
        from .pack import pack

        manifest = pack(args.src, args.out, folds=args.folds, seed=args.seed, block_size=args.block_size,
                        samples_per_shard=args.samples_per_shard, shard_size_mb=args.shard_size,
                        workers=args.workers, overwrite=args.overwrite, progress=sys.stderr.isatty())
        counts = manifest.data["counts"]
        print(f"packed {counts['train']} train and {counts['test']} test tiles into "
              f"{len(manifest.data['shards'])} shards in {manifest.root}")
    elif args.command == "verify":
        from .verify import verify

        verify(args.root)
        print(f"ok: {args.root}")
    else:
        from .describe import describe

        print(describe(args.root))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return ended_as_told(_status(args), argv)


def _status(args) -> int:
    try:
        _run(args)
    except KeyboardInterrupt:   # pack removes what it had written of this run on its way out
        print(f"lc-shard {args.command}: stopped by SIGINT (Ctrl-C)", file=sys.stderr, flush=True)
        return INTERRUPTED
    except InputError as exc:
        print_error(exc)
        return 2
    except WriteError as exc:   # a full disk, a quota, a read-only folder: not the user's input
        print_error(exc)
        return 1
    except BrokenProcessPool:   # pack removed what it had written of this run
        print_error("a reader process was killed (out of memory, or a signal); no shard or manifest of this "
                    "run was kept")
        return 1
    return 0

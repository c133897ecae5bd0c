"""The only argv parser. ``ctray <command> [options] [key=value ...]``.

Exit codes: 0 ok, 2 usage/config/input error (:class:`~ctray.errors.CtrayError`), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from ctray._version import __version__
from ctray.errors import CtrayError

log = logging.getLogger("ctray")

SOURCES = ("fashion-mnist", "digits", "folder", "cifar10", "gtsrb")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("ray", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)


def _not_implemented(name: str) -> int:
    print(f"ctray {name}: not implemented yet", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------- data


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make shards from a real data source, or poison a shard set")
    dsub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name in SOURCES:
        sp = dsub.add_parser(name, help=f"write {name} as WebDataset shards")
        sp.add_argument("--out", required=True, help="output directory")
        sp.add_argument("--n-train", type=int, default=None, help="train samples (default: all)")
        sp.add_argument("--n-clean", type=int, default=None, help="trusted clean reserve, from the test split")
        sp.add_argument("--n-test", type=int, default=None, help="test samples (default: the rest)")
        sp.add_argument("--shard-size", type=int, default=1000)
        sp.add_argument("--seed", type=int, default=0)
        if name == "folder":
            sp.add_argument("--root", required=True, help="ImageFolder tree: ROOT/<class>/<image>")
            sp.add_argument("--image-size", type=int, default=None, help="resize to SIZE x SIZE")
        if name in ("cifar10", "gtsrb"):
            sp.add_argument("--download", action="store_true",
                            help="allow torchvision to download the data set (needs network)")
            sp.add_argument("--root", default=None, help="torchvision data root")
    pp = dsub.add_parser("poison", help="plant a simulated backdoor attack in a shard set")
    pp.add_argument("--in", dest="in_dir", required=True)
    pp.add_argument("--out", required=True)
    pp.add_argument("--attack", required=True)
    pp.add_argument("--rate", type=float, default=0.01, help="poison rate, fraction of the train set")
    pp.add_argument("--target", type=int, default=0)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--cover-rate", type=float, default=None, help="cover samples (attacks with covers)")
    pp.add_argument("options", nargs="*", help="attack options as key=value (e.g. alpha=0.2)")


def _run_data(args: argparse.Namespace) -> int:
    if args.source == "poison":
        from ctray.data.poison import poison_dataset

        opts = _parse_kv(args.options)
        if args.cover_rate is not None:
            opts["cover_rate"] = args.cover_rate
        summary = poison_dataset(args.in_dir, args.out, args.attack, rate=args.rate, target=args.target,
                                 seed=args.seed, options=opts)
    else:
        from ctray.data.sources import make_dataset

        summary = make_dataset(args.source, args.out, n_train=args.n_train, n_clean=args.n_clean,
                               n_test=args.n_test, shard_size=args.shard_size, seed=args.seed,
                               root=getattr(args, "root", None), download=getattr(args, "download", False),
                               image_size=getattr(args, "image_size", None))
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _parse_kv(items: Sequence[str]) -> dict[str, object]:
    import yaml

    from ctray.errors import ConfigError

    out: dict[str, object] = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"expected key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctray", description="Find backdoor-poisoned samples with Confusion Training on Ray.")
    p.add_argument("--version", action="version", version=f"ctray {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=1)
    p.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data(sub)
    for name, help_ in [("demo", "the main job on embedded real data: shard, poison, detect, report"),
                        ("detect", "run Confusion Training over shards and write a run directory"),
                        ("bench", "compare CT with baseline detectors"),
                        ("sweep", "Ray Tune search over CT's knobs"),
                        ("report", "(re)write report.html of a run directory"),
                        ("validate", "resolve and check a config without running")]:
        sub.add_parser(name, help=help_)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "data":
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            return _run_data(args)
        return _not_implemented(args.command)
    except CtrayError as e:
        print(f"ctray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

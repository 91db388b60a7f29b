"""`lowmem data prepare`: turn a folder of images or a set of text files into a streaming dataset.

    lowmem data prepare --kind images --source photos/ --out data/photos [--size 32] [--channels 1|3]
    lowmem data prepare --kind text --source notes/ a.txt --out data/notes [--block_size 64] [--tokenizer bytes]

Then train any family on it with ``--data=lowmem.lightning_modules.StreamingDataModule
--data.init_args.root=<out>``. Bad input ends with one ``lowmem: error: ...`` line and exit 2.
Nothing here imports Lightning (``lowmem data --help`` answers at once).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "data_main"]

_EPILOG = "Train on the result: lowmem fit --config configs/cnn_adamw.yaml " \
          "--data=lowmem.lightning_modules.StreamingDataModule --data.init_args.root=OUT (see docs/data.md)"  # fmt: skip

# Options of one kind only (their default is None, so that giving one with the other kind is caught).
_IMAGE_ONLY = {"size": "--size", "channels": "--channels", "seed": "--seed"}
_TEXT_ONLY = {"block_size": "--block_size", "tokenizer": "--tokenizer"}


def _usage_error(prog: str, message: str) -> None:
    sys.stderr.write(f"lowmem: error: {message} (see `{prog} --help`)\n")
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    """Parse errors as one ``lowmem: error: ...`` line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _usage_error(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowmem data", description="Prepare your own data as litdata chunks for lowmem fit.",
                     epilog=_EPILOG)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="{prepare}")
    prepare = commands.add_parser(
        "prepare", help="images (class sub-folders) or text files -> a dataset folder with train/, val/ and a manifest",
        description="Write --source as a prepared dataset in --out: train/ and val/ litdata chunks and "
        "lowmem_data.json (written last; the folder appears only when complete).", epilog=_EPILOG,
    )  # fmt: skip
    prepare.add_argument("--kind", required=True, choices=["images", "text"],
                         help="images: a folder with one sub-folder of images per class (CNN, diffusion); "
                              "text: text files and folders (language model)")  # fmt: skip
    prepare.add_argument("--source", required=True, nargs="+", metavar="PATH",
                         help="images: the folder of class sub-folders; text: files and/or folders")  # fmt: skip
    prepare.add_argument("--out", required=True, metavar="DIR", help="the dataset folder to create")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at --out")
    prepare.add_argument("--val_fraction", type=float, default=0.1,
                         help="fraction held out for validation, in (0, 1) (default 0.1; images: per class; text: "
                              "the last blocks)")  # fmt: skip
    images = prepare.add_argument_group("images")
    images.add_argument("--size", type=int, help="crop to a square and resize every image to SIZE x SIZE pixels "
                                                 "(default: keep the size, which must then be the same for all)")  # fmt: skip
    images.add_argument("--channels", type=int, choices=[1, 3],
                        help="1: greyscale, 3: RGB (default: 3 if any image has colour, else 1)")
    images.add_argument("--seed", type=int, help="seed of the train/val split (default 0)")
    text = prepare.add_argument_group("text")
    text.add_argument("--block_size", type=int,
                      help="tokens per training sequence (default 64, the block size of configs/lm_*.yaml)")
    text.add_argument("--tokenizer", metavar="SPEC",
                      help="bytes (default; vocabulary 256), tiktoken:<encoding> (tiktoken installed, encoding "
                           "cached), or the path of a Hugging Face tokenizer.json (tokenizers installed)")  # fmt: skip
    return parser


def _misplaced(args: argparse.Namespace) -> str | None:
    """An option given that the chosen --kind does not take."""
    other = _TEXT_ONLY if args.kind == "images" else _IMAGE_ONLY
    given = [flag for key, flag in other.items() if getattr(args, key) is not None]
    return f"{', '.join(given)} applies to --kind {'text' if args.kind == 'images' else 'images'} only" if given else None


def data_main(argv: list[str]) -> int:
    """Run ``lowmem data <argv>``; returns the exit code (0, or 2 for bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (problem := _misplaced(args)) is not None:
        _usage_error("lowmem data prepare", problem)
    from lowmem.data import DataError, prepare_images, prepare_text

    try:
        if args.kind == "images":
            if len(args.source) != 1:
                raise DataError(f"--kind images takes one --source folder (of class sub-folders); got {len(args.source)}")
            _, summary = prepare_images(args.source[0], args.out, size=args.size, channels=args.channels,
                                        val_fraction=args.val_fraction, seed=args.seed or 0, overwrite=args.overwrite)  # fmt: skip
        else:
            _, summary = prepare_text(args.source, args.out, block_size=64 if args.block_size is None else args.block_size,
                                      tokenizer=args.tokenizer or "bytes", val_fraction=args.val_fraction,
                                      overwrite=args.overwrite)  # fmt: skip
    except DataError as err:
        print(f"lowmem: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"lowmem: error: could not read or write {err.filename or args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowmem data: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    print(summary)
    return 0

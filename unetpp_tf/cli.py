"""The `unetpp-tf` command line: a thin front over the library.

Each subcommand parses its flags, calls one library function and prints what it returns.
Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from unetpp_tf._native_logs import native_stderr_silenced


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=("unetpp", "unet"), default="unetpp", help="model architecture")
    parser.add_argument("--preset", choices=("paper",), help="start from a named configuration")
    parser.add_argument("--depth", type=int, help="number of poolings (default 4)")
    parser.add_argument("--filters", type=int, nargs="+", help="base width, or depth+1 widths")
    parser.add_argument("--deep-supervision", action="store_true", help="one head per decoder column")
    parser.add_argument("--input-size", type=int, nargs="+", metavar="N", help="height [width]")
    parser.add_argument("--channels", type=int, default=1, help="input channels (default 1)")
    parser.add_argument("--num-classes", type=int, default=1, help="1 = binary (sigmoid)")


def _model_options(args) -> dict:
    size = args.input_size or [None]
    height, width = size[0], size[-1]
    options = dict(input_shape=(height, width, args.channels), num_classes=args.num_classes)
    if args.depth is not None:
        options["depth"] = args.depth
    if args.filters:
        options["filters"] = args.filters[0] if len(args.filters) == 1 else tuple(args.filters)
    if args.deep_supervision:
        options["deep_supervision"] = True
    return options


def _summary(args) -> int:
    from unetpp_tf.models import build_model, from_preset

    options = _model_options(args)
    if args.preset:
        model = from_preset(args.preset, arch=args.arch, **options)
    else:
        model = build_model(args.arch, **options)
    model.summary(line_length=110, print_fn=lambda line, **_: print(line))
    print(f"{model.name}: {model.count_params():,} parameters, {len(model.outputs)} output(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `unetpp-tf` (all subcommands)."""
    parser = _Parser(prog="unetpp-tf", description="UNet++ image segmentation for Keras and TensorFlow.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    summary = sub.add_parser("summary", help="build a model and print its layers and parameter count")
    _add_model_flags(summary)
    summary.set_defaults(run=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with native_stderr_silenced():
            return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as error:
        print(f"unetpp-tf: error: {error}", file=sys.stderr)
        return 2

"""The scripts' command line: one style of argument validation, one-line errors, documented exit codes.

Every script (``train.py``, ``evaluate.py``, ``predict.py``, ``visualize_attention.py``, ``python -m
dataset.generate_demo`` and ``dataset.make_lists``, ``python -m benchmarks.<name>``) has
``main(argv=None) -> int`` and exits with

* ``0`` (:data:`EXIT_OK`): done;
* ``1`` (:data:`EXIT_FAILURE`): the run failed (bad data, a checkpoint that does not fit the model, a non-finite
  loss, ...): one line ``<script>: error: <message>`` on stderr (:func:`report_failure`);
  every script also reports a :class:`RunFailure` so (an output that cannot be written, a lost peer process);
* ``2`` (:data:`EXIT_USAGE`): a bad command line (argparse's own code): one line
  ``<script>: error: <message> (see --help)`` on stderr (:class:`ArgumentParser`).

:func:`run_main` is such a ``main``, given the script's argument parser, its run and the errors that end a run.

The ``parse_*`` functions and :func:`csv_choices` are argparse ``type=`` callables: text -> value, or
``argparse.ArgumentTypeError`` with a message that shows what was expected.
"""
import argparse
import math
import os
import re
import sys
from typing import Callable, List, Optional, Sequence, Tuple, Type

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# The default of --max-pixels: the pixels one forward pass may take (image or tile x batch, after scaling): 16
# Cityscapes images (1024 x 2048). The activations of a ResNet-101 grow linearly with them.
DEFAULT_MAX_PIXELS = 2 ** 25


class RunFailure(RuntimeError):
    """An error that ends any script's run with one line (:func:`run_main` reports it whatever the script's
    ``failures``): its message names the file, flag or process at fault."""


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already says its default or X is None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the scripts' conventions: defaults shown in ``--help``; a bad command line
    is one line on stderr (not the usage block) and exit code :data:`EXIT_USAGE`."""

    def __init__(self, description: str, **kwargs):
        super().__init__(description=description, formatter_class=_DefaultsHelpFormatter, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")

    def check_pixels(self, what: str, size: Sequence[int], max_pixels: int, batch: int = 1) -> None:
        """:func:`check_pixels` of a parsed size flag, a bad command line (exit :data:`EXIT_USAGE`) if it fails."""
        try:
            check_pixels(what, size[0], size[1], max_pixels, batch)
        except ValueError as error:
            self.error(str(error))


def report_failure(error: BaseException) -> int:
    """Print ``error`` as one line ``<script>: error: <message>`` on stderr; returns :data:`EXIT_FAILURE`.

    ``<script>`` is named as argparse names it: the file name of ``sys.argv[0]``."""
    print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
    return EXIT_FAILURE


def run_main(argv, parse_args: Callable, run: Callable, failures: Tuple[Type[BaseException], ...]) -> int:
    """A script's ``main``: ``run(parse_args(argv))``, and its exit code. A bad command line exits with
    :data:`EXIT_USAGE` (argparse); an exception of ``failures`` is reported in one line (:func:`report_failure`)."""
    args = parse_args(argv)
    try:
        run(args)
    except (RunFailure, *failures) as error:
        return report_failure(error)
    return EXIT_OK


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def parse_positive_int(text: str) -> int:
    """``"3"`` -> 3; an integer >= 1."""
    return _integer(text, 1)


def parse_non_negative_int(text: str) -> int:
    """``"0"`` -> 0; an integer >= 0."""
    return _integer(text, 0)


def _finite(text: str) -> Optional[float]:
    """``text`` as a finite float, else None (``nan``, ``inf`` and words are no numbers of a setting)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_positive_float(text: str) -> float:
    """``"0.5"`` -> 0.5; a finite number > 0."""
    value = _finite(text)
    if value is None or not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def parse_non_negative_float(text: str) -> float:
    """``"0.9"`` -> 0.9; a finite number >= 0 (``nan`` refused: a NaN momentum would train on silently)."""
    value = _finite(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def parse_path(text: str) -> str:
    """A file or folder name: any text but the empty one (``--output ""`` would mean the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return text


def add_max_pixels_argument(parser, default: int = DEFAULT_MAX_PIXELS) -> None:
    """``--max-pixels``: the limit :func:`check_pixels` applies."""
    parser.add_argument("--max-pixels", type=parse_positive_int, default=default,
                        help="refuse, before any allocation, a forward pass over more pixels than this (image or "
                             "tile x batch, after scaling): a size whose tensors cannot fit in memory")


def check_pixels(what: str, height: float, width: float, max_pixels: int, batch: int = 1) -> None:
    """Raise ``ValueError`` (one line naming ``what``, e.g. ``"--input-size 100000,100000"``) when ``batch`` images
    of ``height x width`` pixels (sizes may be fractional or huge: compared as floats, never allocated) exceed
    ``max_pixels``."""
    pixels = float(height) * float(width) * batch
    if not pixels <= max_pixels:  # also NaN
        batch_text = f" x {batch} images" if batch > 1 else ""
        raise ValueError(f"{what}: {height:.0f}x{width:.0f} pixels{batch_text} = {pixels:.3g}, more than --max-pixels "
                         f"{max_pixels} in one forward pass: its tensors would not fit in memory (raise --max-pixels "
                         "if this machine holds them)")


def path_problem(path: str) -> str:
    """Why ``path`` cannot be read, in a few words: ``no such file``, ``no permission to enter the folder X`` (a
    folder of mode 000 hides its files: they are not missing), ``no permission to read it``, ``a folder``."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while ancestor != os.path.dirname(ancestor):
        if os.path.isdir(ancestor) and not os.access(ancestor, os.X_OK):
            return f"no permission to enter the folder {ancestor}"
        ancestor = os.path.dirname(ancestor)
    if os.path.isdir(path):
        return "a folder, not a file"
    if os.path.lexists(path) and not os.path.exists(path):
        return f"a symbolic link to the missing {os.readlink(path)}"
    if os.path.exists(path) and not os.access(path, os.R_OK):
        return "no permission to read it"
    return "no such file"


def parse_gpu_choice(text: str) -> str:
    """``--gpu``: ``"cpu"``, or comma-separated GPU ids (``"0"``, ``"0,1,2,3"``; or the ``GPU-...`` / ``MIG-...``
    UUIDs that ``CUDA_VISIBLE_DEVICES`` also takes) -> the same text, without spaces."""
    if text.strip().lower() == "cpu":
        return "cpu"
    ids = [value.strip() for value in text.split(",")]
    if not all(value.isdigit() or value.startswith(("GPU-", "MIG-")) for value in ids):
        raise argparse.ArgumentTypeError(f"expected GPU ids like 0 or 0,1,2,3 (nvidia-smi -L lists them), or cpu, "
                                         f"got {text!r}")
    return ",".join(ids)


def parse_fraction(text: str) -> float:
    """``"0.7"`` -> 0.7; a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def parse_bool(text: str) -> bool:
    """``0/1``, ``false/true`` or ``no/yes`` (any case) -> bool (the original's ``--ohem`` takes 0/1)."""
    values = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected 0/1 (or true/false), got {text!r}")
    return values[text.lower()]


def parse_auto_bool(text: str) -> Optional[bool]:
    """``auto`` -> None (the script decides, e.g. by device), else :func:`parse_bool`."""
    if text.lower() == "auto":
        return None
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, 0 or 1, got {text!r}") from None


def parse_size(text: str) -> Tuple[int, int]:
    """``"H,W"`` (or ``"HxW"``, or ``"S"`` for a square) -> ``(H, W)``, both positive."""
    parts = re.split(r"[,x]", text.lower())
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a size H,W (e.g. 769,769), HxW or S, got {text!r}")
    return values[0], values[1]


def parse_scales(text: str) -> List[float]:
    """``"0.75,1.0,1.25"`` -> ``[0.75, 1.0, 1.25]``; every scale > 0."""
    expected = f"expected comma-separated numbers (e.g. 0.75,1.0,1.25), got {text!r}"
    try:
        scales = [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if any(not 0 < scale < math.inf for scale in scales):
        raise argparse.ArgumentTypeError(f"scales must be positive and finite, got {text!r}")
    return scales


def parse_point(text: str) -> Tuple[int, int]:
    """``"y,x"`` -> ``(y, x)`` pixel coordinates, both >= 0."""
    try:
        y, x = (int(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'y,x' pixel coordinates, got {text!r}") from None
    if y < 0 or x < 0:
        raise argparse.ArgumentTypeError(f"pixel coordinates must be >= 0, got {text!r}")
    return y, x


def csv_choices(choices: Sequence[str]) -> Callable[[str], List[str]]:
    """A parser of comma-separated values, each one of ``choices``: ``"off,bf16"`` -> ``["off", "bf16"]``."""
    def parse(text: str) -> List[str]:
        values = text.split(",")
        unknown = [value for value in values if value not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return values
    return parse


def parse_numbers(count: int, minimum: float = 0.0) -> Callable[[str], Tuple[float, ...]]:
    """A parser of exactly ``count`` comma-separated numbers, each >= ``minimum``: ``parse_numbers(2)("0.5,1.5")``
    -> ``(0.5, 1.5)``."""
    def parse(text: str) -> Tuple[float, ...]:
        try:
            values = tuple(float(value) for value in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count or not all(math.isfinite(value) and value >= minimum for value in values):
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers >= {minimum:g}, got {text!r}")
        return values
    return parse


def csv_of(parse: Callable[[str], object]) -> Callable[[str], list]:
    """A parser of comma-separated values, each read by ``parse``: ``csv_of(parse_positive_int)("2,8")`` -> ``[2, 8]``;
    an unreadable value gives ``parse``'s message."""
    def parse_all(text: str) -> list:
        return [parse(value) for value in text.split(",")]
    return parse_all

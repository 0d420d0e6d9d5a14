"""The scripts' command line: one style of argument validation, one-line errors, documented exit codes.

Every script (``train.py``, ``evaluate.py``, ``predict.py``, ``visualize_attention.py``, ``python -m
dataset.generate_demo`` and ``dataset.make_lists``, ``python -m benchmarks.<name>``) has
``main(argv=None) -> int`` and exits with

* ``0`` (:data:`EXIT_OK`): done;
* ``1`` (:data:`EXIT_FAILURE`): the run failed (bad data, a checkpoint that does not fit the model, a non-finite
  loss, ...): one line ``<script>: error: <message>`` on stderr (:func:`report_failure`);
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
    except failures as error:
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


def parse_positive_float(text: str) -> float:
    """``"0.5"`` -> 0.5; a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


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
    if any(not scale > 0 for scale in scales):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
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

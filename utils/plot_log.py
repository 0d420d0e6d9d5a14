"""Plot a training log (train.py's ``train_log.csv``) as a PNG: the loss and its parts, the learning rate and, when the
run validated (``--val-every``), the val mIoU, pixel accuracy and mean accuracy, all against the iteration.

    python -m utils.plot_log snapshots/logs/train_log.csv                       # -> snapshots/logs/train_log.png
    python -m utils.plot_log snapshots/logs/train_log.csv --output curves.png

The PNG is :data:`WIDTH_PX` pixels wide and :data:`PANEL_HEIGHT_PX` high per panel (two panels, three with
validation); it is written whole or not at all, and never replaces the log or a file that is not a PNG.
"""
import csv
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

from utils.cli import ArgumentParser, parse_path, run_main
from utils.logger import VALIDATION_PREFIX
from utils.outputs import OutputError, atomic_output, check_output_file

WIDTH_PX = 1000
PANEL_HEIGHT_PX = 300
DPI = 100
NOT_LOSS_PARTS = ("iteration", "lr", "elapsed_s")  # the columns that are neither the loss nor one of its parts


class LogError(ValueError):
    """A CSV file that is not a training log (or holds no row to plot); the message names the file."""


def read_log(path: str) -> Dict[str, List[float]]:
    """The columns of a training log by name, each a list of floats (NaN where a row leaves the cell empty: the
    rows without validation), in row order; ``iteration`` first. Raises :class:`LogError` for a file that has no
    ``iteration`` and ``loss`` columns, no row, or a cell that is not a number."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as error:
        raise LogError(f"{path}: cannot be read ({getattr(error, 'strerror', None) or error})") from None
    if not rows or "iteration" not in rows[0] or "loss" not in rows[0]:
        raise LogError(f"{path}: not a training log of train.py (no 'iteration' and 'loss' columns)")
    header, body = rows[0], [row for row in rows[1:] if row]
    if not body:
        raise LogError(f"{path}: no rows to plot (the run logged no iteration yet)")
    columns: Dict[str, List[float]] = {name: [] for name in header}
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise LogError(f"{path} line {line}: {len(row)} cells, the header names {len(header)} (a row cut short?)")
        for name, cell in zip(header, row):
            try:
                columns[name].append(float(cell) if cell else math.nan)
            except ValueError:
                raise LogError(f"{path} line {line}: column {name} holds {cell!r}, not a number") from None
    return columns


def _plot_series(axes, iterations: Sequence[float], columns: Dict[str, List[float]], names: Sequence[str],
                 scale: float = 1.0) -> None:
    """One line per column of ``names`` against ``iterations``, only the rows where it has a value."""
    for name in names:
        points = [(x, scale * y) for x, y in zip(iterations, columns[name]) if not math.isnan(y)]
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) < 50 else None, markersize=3, label=name)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize="small")


def plot_log(csv_path: str, output: str) -> None:
    """Write the PNG ``output`` of the training log ``csv_path`` (see the module's description)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    columns = read_log(csv_path)
    iterations = columns["iteration"]
    loss_parts = [name for name in columns if name not in NOT_LOSS_PARTS and not name.startswith(VALIDATION_PREFIX)]
    validation = [name for name in columns if name.startswith(VALIDATION_PREFIX)
                  and any(not math.isnan(value) for value in columns[name])]
    panels = 2 + bool(validation)
    figure, axes = plt.subplots(panels, 1, sharex=True, dpi=DPI,
                                figsize=(WIDTH_PX / DPI, panels * PANEL_HEIGHT_PX / DPI))
    try:
        _plot_series(axes[0], iterations, columns, loss_parts)
        axes[0].set_ylabel("loss")
        axes[0].set_title(os.path.basename(os.path.dirname(os.path.abspath(csv_path))) + "/"
                          + os.path.basename(csv_path), fontsize="medium")
        _plot_series(axes[1], iterations, columns, [name for name in ("lr",) if name in columns])
        axes[1].set_ylabel("learning rate")
        if validation:
            _plot_series(axes[2], iterations, columns, validation, scale=100.0)
            axes[2].set_ylabel("validation (%)")
        axes[-1].set_xlabel("iteration")
        figure.tight_layout()
        with atomic_output(output) as temporary:
            figure.savefig(temporary, format="png", dpi=DPI)
    finally:
        plt.close(figure)


def default_output(csv_path: str) -> str:
    """``<folder>/<name>.png`` beside the log ``<folder>/<name>.csv``."""
    return os.path.splitext(csv_path)[0] + ".png"


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("log", type=parse_path, help="train.py's train_log.csv (in <snapshot-dir>/logs by default)")
    parser.add_argument("--output", type=parse_path, default=None,
                        help="the PNG to write; default: beside the log, train_log.png")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = default_output(args.log)
    return args


def run(args) -> None:
    check_output_file("--output", args.output, [args.log], suffixes=(".png",))
    plot_log(args.log, args.output)
    print(f"wrote {args.output}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 written, 1 a log that cannot be plotted or an output that cannot be written (one line on
    stderr), 2 bad command line."""
    return run_main(argv, parse_args, run, (LogError, OutputError, ValueError))


if __name__ == "__main__":
    sys.exit(main())

"""Training log: a tqdm progress bar, TensorBoard scalars and a CSV file, written by the main process only.

A log that cannot be written (a full disk, a read-only ``--log-dir``) never stops the training: the CSV and the
TensorBoard events each stop with one warning line naming the file or folder, and the snapshots go on (a snapshot
that cannot be written stops the run, naming the last good one)."""
import csv
import os
import threading
import time
from typing import Optional, Sequence

from tqdm import tqdm

VALIDATION_PREFIX = "val_"  # the CSV columns of the validation scores: val_miou, ...


def _truncate_csv(path: str, last_iteration: int) -> None:
    """Keep the header and the rows up to ``last_iteration`` of a CSV log; drop the later ones and any row that a
    killed process left incomplete. Rewritten atomically (a temporary file, then ``os.replace``): a crash meanwhile
    leaves the old file; an ``OSError`` (raised again) leaves it and removes the temporary file."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    header = rows[0]
    kept = [header] + [row for row in rows[1:] if _complete_row(row, len(header))
                       and int(row[0]) <= last_iteration]
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError:  # e.g. a full disk: the old file stays, no partial copy beside it
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _complete_row(row: list, columns: int) -> bool:
    """Whether ``row`` has every column, an iteration and a number or nothing in each other cell (a row cut by a
    kill has not; an empty cell is a column that run did not log, e.g. a loss term of a later version)."""
    if len(row) != columns:
        return False
    try:
        int(row[0])
        for value in row[1:]:
            if value:
                float(value)
    except ValueError:
        return False
    return True


def _csv_header(path: str) -> list:
    """The column names of an existing CSV log ([] for a missing or empty file)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


class TrainingLogger:
    """``log(iteration, loss=..., lr=...)`` after each step (``terms={...}``: the loss's parts, more columns;
    ``validation={...}``: the scores of a validation after that step); ``close()`` at the end.

    ``log_dir`` receives the TensorBoard event files (``train/<name>``, ``val/<name>``) and ``train_log.csv``
    (columns: iteration, the scalar names in their first-call order, seconds since the start, the names of
    ``terms``, then ``val_<name>`` for each of ``validation_names``, empty in the rows without a validation),
    flushed at every row: a killed run keeps its rows. On resume (``start_step > 0``) the CSV keeps its rows up to
    ``start_step`` (those of an interrupted run after its snapshot are dropped) and is appended to under its own
    header: a column it lacks is not written (one warning), a column of it this run does not log stays empty; the
    TensorBoard events are appended to as well. With ``enabled=False`` (the other ranks) every method does nothing.
    """

    CSV_NAME = "train_log.csv"

    def __init__(self, log_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 validation_names: Sequence[str] = ()):
        self.enabled = enabled
        self.validation_columns = [VALIDATION_PREFIX + name for name in validation_names]
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported here: the other ranks never need it

        self.log_dir = log_dir
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="it", dynamic_ncols=True)
        self.csv_path = os.path.join(log_dir, self.CSV_NAME)
        self.csv_file = None
        self.csv_writer = None
        self.csv_stopped = False  # after a write failed (see _stop_csv)
        self.writer = None  # None: TensorBoard's events are not (or no longer) written (see _stop_tensorboard)
        self._previous_excepthook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread
        try:
            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)
        except OSError as error:
            self._stop_tensorboard(start_step + 1, error)
        try:
            if start_step and os.path.exists(self.csv_path):
                _truncate_csv(self.csv_path, start_step)
        except OSError as error:  # its later rows would follow rows of the interrupted run: no CSV rather
            self._stop_csv(start_step + 1, error)
        self.skipped = 0
        self.start_time = time.time()

    def _quiet_writer_thread(self, hook_args) -> None:
        """``threading.excepthook`` while the log is open: the ``OSError`` that kills TensorBoard's writer thread
        (a full disk) is raised again by the next ``add_scalar`` and reported there in one line (not a thread
        traceback); everything else goes to the previous hook."""
        if not (issubclass(hook_args.exc_type, OSError) and type(hook_args.thread).__name__ == "_AsyncWriterThread"):
            self._previous_excepthook(hook_args)

    def _stop_tensorboard(self, iteration: int, error: OSError) -> None:
        """Write no more TensorBoard events after ``error``; say so in one line (training goes on, as for the CSV)."""
        self.message(f"warning: {self.log_dir}: TensorBoard events from iteration {iteration} on not written "
                     f"({error.strerror or error}); training goes on")
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass

    def _open_csv(self, fields: list[str]) -> None:
        """Open the CSV for appending; a new file gets the header ``fields``, an existing one keeps its own."""
        header = _csv_header(self.csv_path)
        self.csv_file = open(self.csv_path, "a", newline="", encoding="utf-8")
        self.csv_writer = csv.DictWriter(self.csv_file, fieldnames=header or fields, restval="", extrasaction="ignore")
        if not header:
            self.csv_writer.writeheader()
        not_written = [name for name in fields if name not in (header or fields)]
        if not_written:
            self.message(f"warning: {self.csv_path}: its columns ({', '.join(header)}) lack "
                         f"{', '.join(not_written)}: those values go to TensorBoard only")

    def log(self, iteration: int, terms: Optional[dict] = None, validation: Optional[dict] = None,
            **scalars: float) -> None:
        """Record the scalars of 1-based ``iteration`` (the number of steps done); ``terms`` (name -> value) are
        logged like the scalars, their CSV columns after ``elapsed_s``; ``validation`` (name -> score, names of
        ``validation_names``) goes to TensorBoard's ``val/<name>`` and the CSV's ``val_<name>``."""
        if not self.enabled:
            return
        terms = terms or {}
        self._add_scalars(iteration, {**{f"train/{name}": value for name, value in {**scalars, **terms}.items()},
                                      **self._validation_scalars(validation)})
        self._write_row(iteration, ["iteration", *scalars, "elapsed_s", *terms, *self.validation_columns],
                        {**scalars, **terms, **self._validation_cells(validation)})
        self.bar.set_postfix({name: f"{value:.4g}" for name, value in scalars.items()}, refresh=False)
        self.bar.update(1)

    @staticmethod
    def _validation_scalars(validation: Optional[dict]) -> dict:
        return {f"val/{name}": value for name, value in (validation or {}).items()}

    @staticmethod
    def _validation_cells(validation: Optional[dict]) -> dict:
        return {VALIDATION_PREFIX + name: value for name, value in (validation or {}).items()}

    def _add_scalars(self, iteration: int, tagged: dict) -> None:
        """TensorBoard scalars ``tag -> value`` of ``iteration``."""
        if self.writer is None:
            return
        try:
            for tag, value in tagged.items():
                self.writer.add_scalar(tag, value, iteration)
        except OSError as error:  # raised by the writer thread's failed write, here or at a later call
            self._stop_tensorboard(iteration, error)

    def _write_row(self, iteration: int, fields: list, values: dict) -> None:
        """One CSV row of ``iteration``; ``fields``: the header of a new file (an existing file keeps its own)."""
        if self.csv_stopped:
            return
        try:
            if self.csv_writer is None:
                self._open_csv(fields)
            self.csv_writer.writerow({"iteration": iteration, **values,
                                      "elapsed_s": round(time.time() - self.start_time, 3)})
            self.csv_file.flush()  # in the operating system's hands: survives the process being killed
        except OSError as error:  # e.g. a full disk: the log stops, the training goes on
            self._stop_csv(iteration, error)

    def _stop_csv(self, iteration: int, error: OSError) -> None:
        """Write no more CSV rows after ``error``; say so in one line. Training goes on: stopping rank 0 alone would
        leave the other processes waiting, and a snapshot that cannot be written stops the run on every rank."""
        self.message(f"warning: {self.csv_path}: rows from iteration {iteration} on not written "
                     f"({error.strerror or error}); training goes on")
        self.csv_stopped = True
        try:
            if self.csv_file is not None:
                self.csv_file.close()
        except OSError:
            pass
        self.csv_file = None

    def skip(self, reason: str, iteration: int = 0, validation: Optional[dict] = None) -> None:
        """An iteration that made no training step: the progress bar advances, no CSV row is written (but for
        ``validation``'s scores of 1-based ``iteration``: a row of them alone, once the CSV has its header);
        ``reason`` is printed for the first such iteration of the run only (train.py lists them all at the end)."""
        if not self.enabled:
            return
        if not self.skipped:
            self.message(reason)
        self.skipped += 1
        if validation:
            self._add_scalars(iteration, self._validation_scalars(validation))
            if self.csv_writer is not None or _csv_header(self.csv_path):  # a header made by a step's row
                self._write_row(iteration, [], self._validation_cells(validation))
        self.bar.update(1)

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as error:
                self._stop_tensorboard(self.bar.n, error)
        if self.csv_file is not None:
            try:
                self.csv_file.close()
            except OSError as error:
                self._stop_csv(self.bar.n, error)
        threading.excepthook = self._previous_excepthook

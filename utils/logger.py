"""Training log: a tqdm progress bar, TensorBoard scalars and a CSV file, written by the main process only."""
import csv
import os
import time

from tqdm import tqdm


class TrainingLogger:
    """``log(iteration, loss=..., lr=...)`` after each step; ``close()`` at the end.

    ``log_dir`` receives the TensorBoard event files and ``train_log.csv`` (columns: iteration, the scalar names
    in their first-call order, seconds since the start). On resume the CSV is appended to. With
    ``enabled=False`` (the other ranks) every method does nothing.
    """

    CSV_NAME = "train_log.csv"

    def __init__(self, log_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported here: the other ranks never need it

        os.makedirs(log_dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)
        self.csv_path = os.path.join(log_dir, self.CSV_NAME)
        self.csv_file = None
        self.csv_writer = None
        self.start_time = time.time()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="it", dynamic_ncols=True)

    def _open_csv(self, fields: list[str]) -> None:
        new_file = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        self.csv_file = open(self.csv_path, "a", newline="", encoding="utf-8")
        self.csv_writer = csv.DictWriter(self.csv_file, fieldnames=["iteration", *fields, "elapsed_s"])
        if new_file:
            self.csv_writer.writeheader()

    def log(self, iteration: int, **scalars: float) -> None:
        """Record the scalars of 1-based ``iteration`` (the number of steps done)."""
        if not self.enabled:
            return
        if self.csv_writer is None:
            self._open_csv(list(scalars))
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, iteration)
        self.csv_writer.writerow({"iteration": iteration, **scalars,
                                  "elapsed_s": round(time.time() - self.start_time, 3)})
        self.bar.set_postfix({name: f"{value:.4g}" for name, value in scalars.items()}, refresh=False)
        self.bar.update(1)

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.writer.close()
        if self.csv_file is not None:
            self.csv_file.close()

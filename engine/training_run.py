"""A training run's life cycle, the policies train.py follows around its loop:

* its folders: :func:`claim_run_folders` locks ``--snapshot-dir`` and ``--log-dir`` for the run, refuses (or with
  ``--overwrite-snapshots`` clears) another run's files there, refuses a ``--resume`` into another run's folders,
  and removes the temporary files of an interrupted save;
* its identity: a run id, new for a fresh run and kept by ``--resume``, saved in every snapshot (``args["run_id"]``)
  and in ``<log-dir>/run_id``: files of another run id are another run's;
* resume (:func:`resume_or_start`): weights, optimizer, fp16 gradient scale, iteration, every process's random
  states, and a warning for each run-defining flag that changed;
* the save (:func:`save_snapshot`): atomic, and only when every weight, buffer and optimizer tensor is finite;
* the rank-0 error relay (:func:`on_main_process`, :func:`log_on_main`): what rank 0 alone does (the folders, the
  save) stops every rank when it fails, instead of leaving the others waiting at the next collective;
* the label checks of each batch (:func:`label_problems`).
"""
import os
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch

from dataset.segmentation import DataError
from engine.train_step import load_optimizer_state
from utils.checkpoint import (CheckpointError, FolderLock, FolderLockedError, load_checkpoint, load_model_weights,
                              non_finite_tensors, remove_temporary_files, save_checkpoint)
from utils.distributed import all_reduce_sum, is_main_process
from utils.logger import TrainingLogger
from utils.rng import saved_rng_state, seed_all, set_rng_state

SNAPSHOT_PATTERN = "CS_scenes_{}.pth"
SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX = SNAPSHOT_PATTERN.split("{}")
BEST_SNAPSHOT_NAME = SNAPSHOT_PATTERN.format("best")  # --val-every's best snapshot: no iteration snapshot
RUN_ID_FILE = "run_id"  # in --log-dir: the id of the run whose log the folder holds
# Flags whose change makes a resumed run differ from the uninterrupted one (warned about on --resume).
RUN_DEFINING_FLAGS = ("dataset", "data_list", "input_size", "batch_size", "learning_rate", "momentum", "weight_decay",
                      "power", "num_steps", "recurrence", "ohem", "ohem_thres", "ohem_keep", "random_mirror",
                      "random_scale", "random_seed", "num_classes", "backbone", "model", "amp", "ccl", "ccl_dim",
                      "ccl_margins", "ccl_weights", "clip_length", "frame_stride")

Log = Callable[[str], None]


class TrainingError(RuntimeError):
    """A condition that stops training with a one-line message (bad flag, non-finite loss, a folder refused)."""


# The errors that stop a run with one line on stderr and exit code 1.
FAILURES = (CheckpointError, DataError, FileNotFoundError, TrainingError, ValueError)


# ------------------------------------------------------------------------------------------ rank 0's work
def log_on_main(text: str) -> None:
    """One line on stderr, from rank 0 only."""
    if is_main_process():
        print(text, file=sys.stderr, flush=True)


def on_main_process(action: Callable, device: torch.device):
    """``action()`` on rank 0 only; returns its result there (None on the other ranks). If it raised one of
    :data:`FAILURES`, every process raises (rank 0 that error, the others one that points to it), so that no
    process waits forever for rank 0 at the next collective operation. A collective: every rank calls it."""
    result, error = None, None
    if is_main_process():
        try:
            result = action()
        except FAILURES as caught:
            error = caught
    if all_reduce_sum(torch.tensor([float(error is not None)], device=device)).item():
        raise error or TrainingError("stopped by the main process (rank 0): see its error line")
    return result


# ------------------------------------------------------------------------------------------ the run folders
def snapshot_path(snapshot_dir: str, iteration: int) -> str:
    """``<snapshot_dir>/CS_scenes_<iteration>.pth``."""
    return os.path.join(snapshot_dir, SNAPSHOT_PATTERN.format(iteration))


def best_snapshot_path(snapshot_dir: str) -> str:
    """``<snapshot_dir>/CS_scenes_best.pth``: the snapshot of the best validation score so far (``--val-every``)."""
    return os.path.join(snapshot_dir, BEST_SNAPSHOT_NAME)


def snapshot_iteration(path: Path) -> int:
    """``CS_scenes_<iter>.pth`` -> iter (-1 if the name holds no number: ``CS_scenes_best.pth``)."""
    number = path.name[len(SNAPSHOT_PREFIX):-len(SNAPSHOT_SUFFIX)]
    return int(number) if number.isdigit() else -1


def snapshots_in(folder: str) -> List[Path]:
    """The iteration snapshots ``CS_scenes_<iter>.pth`` in ``folder``, sorted by iteration (not the best one)."""
    return sorted((path for path in Path(folder).glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}")
                   if snapshot_iteration(path) >= 0), key=snapshot_iteration)


def run_snapshots_in(folder: str) -> List[Path]:
    """Every snapshot a run writes in ``folder``: the best one (if any), then the iteration snapshots by iteration."""
    best = Path(best_snapshot_path(folder))
    return ([best] if best.is_file() else []) + snapshots_in(folder)


def new_run_id() -> str:
    """A fresh run's id: 16 random hex digits."""
    return uuid.uuid4().hex[:16]


def snapshot_run_id(path) -> Optional[str]:
    """The run id saved in snapshot ``path`` (``args["run_id"]``); None for a snapshot without one (written
    before runs had ids, or not ours) or a file that does not load (its loader names the fault later). The
    tensors are memory-mapped, not read."""
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file, truncated, not a file: no id to read
        return None
    saved_args = snapshot.get("args") if isinstance(snapshot, dict) else None
    run_id = saved_args.get("run_id") if isinstance(saved_args, dict) else None
    return run_id if isinstance(run_id, str) else None


def log_run_id(log_dir: str) -> Optional[str]:
    """The run id that ``<log_dir>/run_id`` names (None without the file)."""
    try:
        return (Path(log_dir) / RUN_ID_FILE).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def earlier_run_files(snapshot_dir: str, log_dir: str) -> tuple:
    """(snapshots: the best one if any, then the iteration snapshots by iteration; the CSV log or None) that an
    earlier run left in this run's folders."""
    csv_log = Path(log_dir) / TrainingLogger.CSV_NAME
    return run_snapshots_in(snapshot_dir), (csv_log if csv_log.is_file() and csv_log.stat().st_size else None)


def refuse_or_clear_earlier_run(snapshot_dir: str, log_dir: str, overwrite: bool, log: Log) -> None:
    """A run without ``--resume`` in folders that hold another run's snapshots or CSV log: refused, or with
    ``overwrite`` (``--overwrite-snapshots``) those files, the TensorBoard events and the log's run id are deleted,
    so that no folder mixes two runs."""
    snapshots, csv_log = earlier_run_files(snapshot_dir, log_dir)
    if not snapshots and csv_log is None:
        return
    if not overwrite:
        resumable = [path for path in snapshots if snapshot_iteration(path) >= 0]
        if resumable:
            raise TrainingError(
                f"--snapshot-dir {snapshot_dir} holds another run's snapshots ({len(snapshots)}, the last "
                f"{resumable[-1]}): pass --resume {resumable[-1]} to continue that run, or choose another "
                "--snapshot-dir (--overwrite-snapshots deletes them and starts afresh)")
        if snapshots:
            raise TrainingError(
                f"--snapshot-dir {snapshot_dir} holds another run's {snapshots[0]}: choose another --snapshot-dir, "
                "or pass --overwrite-snapshots to delete it and start afresh")
        raise TrainingError(
            f"--log-dir {log_dir} holds another run's {csv_log.name}: choose another --snapshot-dir (or "
            "--log-dir), or pass --overwrite-snapshots to delete it and start afresh")
    events = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    run_id_file = Path(log_dir) / RUN_ID_FILE
    deleted = [*snapshots, *([csv_log] if csv_log else []), *events, *([run_id_file] if run_id_file.is_file() else [])]
    for path in deleted:
        path.unlink()
    log(f"--overwrite-snapshots: deleted {len(deleted)} files of an earlier run (snapshots "
        f"{', '.join(path.name for path in snapshots) or 'none'}; its logs)")


def refuse_another_runs_folders(snapshot_dir: str, log_dir: str, resume: str, resumed_run_id: Optional[str]) -> None:
    """``--resume`` of run ``resumed_run_id`` (None: a snapshot without an id) into folders that hold snapshots or a
    log of another run id: refused, as a fresh run there is (its files would be replaced and its log truncated).
    Snapshots without an id (written before runs had ids) identify no run and are not compared."""
    others = [(path, run_id) for path in run_snapshots_in(snapshot_dir)
              if (run_id := snapshot_run_id(path)) is not None and run_id != resumed_run_id]
    if others:
        path, run_id = others[-1]
        raise TrainingError(
            f"--snapshot-dir {snapshot_dir} holds snapshots of another run (run {run_id}, the last {path}) than "
            f"--resume {resume} (run {resumed_run_id or 'without an id'}): choose another --snapshot-dir (the "
            "resumed run continues there)")
    logged = log_run_id(log_dir)
    if logged is not None and logged != resumed_run_id and earlier_run_files(snapshot_dir, log_dir)[1] is not None:
        raise TrainingError(
            f"--log-dir {log_dir} holds the log of another run (run {logged}) than --resume {resume} (run "
            f"{resumed_run_id or 'without an id'}): choose another --snapshot-dir (or --log-dir)")


@dataclass
class RunFolders:
    """The folders a run holds (see :func:`claim_run_folders`): its id and its locks, until :meth:`release`."""

    run_id: str
    locks: List[FolderLock] = field(default_factory=list)

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()


def _lock(folder: str, flag: str) -> FolderLock:
    try:
        return FolderLock(folder)
    except FolderLockedError as error:
        raise TrainingError(f"{flag} {folder} is in use by another training run ({error}): wait for it to end, or "
                            f"choose another {flag}") from None
    except OSError as error:  # not a folder, no permission, a read-only file system
        raise TrainingError(f"{flag} {folder}: cannot be written ({error})") from None


def _same_folder(first: str, second: str) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


def claim_run_folders(snapshot_dir: str, log_dir: str, resume: Optional[str] = None, overwrite: bool = False,
                      log: Log = log_on_main) -> RunFolders:
    """Lock ``snapshot_dir`` and ``log_dir`` (each a :class:`FolderLock`, created if absent) for this run, then:
    without ``resume``, refuse or clear another run's files (:func:`refuse_or_clear_earlier_run`); with it, refuse
    folders of another run (:func:`refuse_another_runs_folders`); record the run id in ``<log_dir>/run_id``; remove
    the temporary files of an interrupted snapshot save (ours only: ``.CS_scenes_<i>.pth.<hex>.tmp``). Rank 0 only.

    Returns the :class:`RunFolders` (the run id: the resumed snapshot's, else a new one); on an error the locks are
    released."""
    folders = RunFolders(run_id="")
    try:
        folders.locks.append(_lock(snapshot_dir, "--snapshot-dir"))
        if not _same_folder(snapshot_dir, log_dir):
            folders.locks.append(_lock(log_dir, "--log-dir"))
        resumed_run_id = snapshot_run_id(resume) if resume is not None else None
        if resume is None:
            refuse_or_clear_earlier_run(snapshot_dir, log_dir, overwrite, log)
        else:
            refuse_another_runs_folders(snapshot_dir, log_dir, resume, resumed_run_id)
        folders.run_id = resumed_run_id or new_run_id()
        try:
            (Path(log_dir) / RUN_ID_FILE).write_text(folders.run_id + "\n", encoding="utf-8")
        except OSError as error:
            raise TrainingError(f"--log-dir {log_dir}: cannot be written ({error})") from None
        for path in remove_temporary_files(snapshot_dir, targets=f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}"):
            log(f"removed {path}: the temporary file of an interrupted snapshot save")
    except BaseException:
        folders.release()
        raise
    return folders


@contextmanager
def run_folders_claimed(args, device: torch.device):
    """``with ... as folders``: :func:`claim_run_folders` of ``args`` on rank 0 (``folders`` None on the other
    ranks), every rank told whether that worked; released at the end (and by the kernel, if the process dies)."""
    folders = on_main_process(lambda: claim_run_folders(args.snapshot_dir, args.log_dir, args.resume,
                                                        args.overwrite_snapshots), device)
    try:
        yield folders
    finally:
        if folders is not None:
            folders.release()


# ----------------------------------------------------------------------------------------------- resume
def _normalized(value):
    """Lists and tuples compare as lists (an ``input_size`` tuple may come back from a snapshot as a list)."""
    return [_normalized(item) for item in value] if isinstance(value, (list, tuple)) else value


def check_resumed_args(saved: dict, args, log: Log) -> None:
    """One warning naming every :data:`RUN_DEFINING_FLAGS` flag whose value differs from the snapshot's ``saved``
    args (flags the snapshot does not name are not compared)."""
    changed = [f"--{name.replace('_', '-')} {saved[name]!r} -> {getattr(args, name)!r}"
               for name in RUN_DEFINING_FLAGS
               if name in saved and _normalized(saved[name]) != _normalized(getattr(args, name))]
    if changed:
        log("warning: the resumed run differs from the snapshot's: " + "; ".join(changed))


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict, log: Log) -> None:
    """The fp16 gradient scale, when both the snapshot's and this run's scalers are enabled (a disabled scaler
    saves ``{}``); otherwise, i.e. ``--amp`` changed from or to fp16, one warning and a fresh scale."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)
    elif scaler.is_enabled() or state:
        log("warning: --amp changed to or from fp16 since the snapshot: the gradient scaler starts afresh")


def resume_or_start(args, model: torch.nn.Module, optimizer, scaler, rank: int, world_size: int,
                    device: torch.device, log: Log, validation=None) -> int:
    """The iteration the run starts after: with ``args.resume``, the snapshot's, its weights, optimizer state,
    gradient scale and this rank's random states restored (another number of processes: the random states are
    re-seeded, with a warning), and ``validation``'s best score so far (``load_state_dict`` of the snapshot's
    ``validation``, ``{}`` when it has none); without, 0, every random generator seeded (``--random-seed`` + rank:
    dropout draws differ between ranks). Raises :class:`TrainingError` for a file that is not a snapshot of
    train.py or a snapshot at or past ``--num-steps``."""
    if args.resume is None:
        seed_all(args.random_seed + rank)
        return 0
    checkpoint = load_checkpoint(args.resume)
    if "optimizer" not in checkpoint:
        raise TrainingError(f"--resume {args.resume}: holds no optimizer state (a bare state dict, not a snapshot "
                            f"of train.py): to start from its weights, pass --restore-from {args.resume} instead")
    missing = [key for key in ("model", "iteration", "rng") if key not in checkpoint]
    if missing:
        raise TrainingError(f"--resume {args.resume}: not a snapshot of train.py (no {', '.join(missing)})")
    load_model_weights(model, checkpoint, name=args.resume)
    load_optimizer_state(optimizer, checkpoint["optimizer"])
    load_scaler_state(scaler, checkpoint.get("scaler") or {}, log)
    if validation is not None:
        validation.load_state_dict(checkpoint.get("validation") or {})
    start_iteration = int(checkpoint["iteration"])
    check_resumed_args(checkpoint.get("args", {}), args, log)
    rng = checkpoint["rng"]
    rng_state = saved_rng_state(rng, rank, world_size, f"--resume {args.resume}")
    if rng_state is not None:
        set_rng_state(rng_state, device, f"--resume {args.resume}")
    else:
        log(f"warning: the snapshot was written by {rng['world_size']} processes, this run has {world_size}: "
            "the data order and the random draws differ from an uninterrupted run")
        torch.manual_seed(args.random_seed + start_iteration + rank)
    if start_iteration >= args.num_steps:
        raise TrainingError(f"--resume {args.resume} is at iteration {start_iteration}, --num-steps is "
                            f"{args.num_steps}: nothing to do")
    log(f"resumed from {args.resume} at iteration {start_iteration}")
    return start_iteration


# ------------------------------------------------------------------------------------------------- the loss
def mean_loss_terms(loss: torch.Tensor, terms: dict, world_size: int) -> tuple:
    """(the loss averaged over the processes, each of ``terms`` averaged likewise (name -> float), the number of
    processes whose loss is not finite), in ONE all-reduce (a collective). ``loss`` a scalar tensor, ``terms``
    name -> scalar tensor, the same names on every process."""
    values = [loss.detach().float(), (~torch.isfinite(loss.detach())).float(),
              *(value.detach().float() for value in terms.values())]
    sums = all_reduce_sum(torch.stack(values)).tolist()
    means = {name: total / world_size for name, total in zip(terms, sums[2:])}
    return sums[0] / world_size, means, int(sums[1])


# ------------------------------------------------------------------------------------------------- the save
def snapshot_state(model: torch.nn.Module, optimizer, scaler, iteration: int, args, run_id: str,
                   rng_states: list, validation: Optional[dict] = None) -> dict:
    """What a snapshot holds: ``model``, ``optimizer``, ``iteration``, ``rng`` (every rank's states, indexed by
    rank), ``scaler`` and ``args`` (the flags, and ``run_id``); with ``--val-every``, ``validation`` (the best
    score so far and its iteration: ``engine.validation.Validation.state_dict``)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
             "rng": {"world_size": len(rng_states), "ranks": rng_states}, "scaler": scaler.state_dict(),
             "args": {**vars(args), "run_id": run_id}}
    if validation is not None:
        state["validation"] = validation
    return state


def save_snapshot(state: dict, path: str, last_snapshot: Optional[str]) -> None:
    """Write ``state`` to ``path`` (atomically) if all its tensors (weights, buffers, optimizer, scaler) are finite;
    otherwise, or if the file system refuses the write, a :class:`TrainingError` that names the last snapshot
    written (``last_snapshot``)."""
    last = f"Last good snapshot: {last_snapshot or 'none written yet'}"
    non_finite = non_finite_tensors(state)  # every tensor the loaders check: the model, optimizer, scaler
    if non_finite:
        raise TrainingError(f"iteration {state['iteration']}: {len(non_finite)} tensor(s) hold NaN or infinite values "
                            f"(first: {non_finite[0]}); {path} not written, training stopped. {last}")
    try:
        save_checkpoint(state, path)
    except CheckpointError as error:
        raise TrainingError(f"{error}; training stopped at iteration {state['iteration']}. {last}") from error


# ---------------------------------------------------------------------------------------------- the labels
def label_problems(labels: torch.Tensor, names, args, iteration: int) -> tuple:
    """(whether no pixel of this process's batch is valid, a message for a label id the network cannot predict or
    None). labels (N, H, W) int64 train ids on the CPU, void = ``args.ignore_label``; ``names`` the samples'
    image paths; the message names ``args.data_list`` and the 1-based ``iteration``."""
    valid = labels != args.ignore_label
    out_of_range = valid & ((labels < 0) | (labels >= args.num_classes))
    message = None
    if out_of_range.any():
        sample = int(out_of_range.flatten(1).any(1).nonzero()[0])
        value = int(labels[sample][out_of_range[sample]][0])
        message = (f"iteration {iteration}: the label of {names[sample]} ({args.data_list}) holds train id {value}, "
                   f"outside 0..{args.num_classes - 1} of --num-classes {args.num_classes} (the void label "
                   f"{args.ignore_label} aside): pass the dataset's number of classes, or fix the label")
    return not bool(valid.any()), message


def void_batch_processes(labels: torch.Tensor, names, args, iteration: int, world_size: int,
                         device: torch.device) -> int:
    """How many processes' batches hold no valid label pixel (the iteration is then skipped by all: a process that
    skipped a step alone would wait forever); a :class:`TrainingError` on every process when any batch holds a
    label id outside ``--num-classes``. A collective (one all-reduce); a single process keeps the flags on the
    CPU (no copy to the GPU, no wait for its queued work)."""
    all_void, bad_label = label_problems(labels, names, args, iteration)
    problems = all_reduce_sum(torch.tensor([float(all_void), float(bad_label is not None)],
                                           device=device if world_size > 1 else "cpu"))
    void_processes, bad_label_processes = (int(count) for count in problems.tolist())
    if bad_label_processes:
        raise TrainingError(bad_label or f"iteration {iteration}: another process's batch holds a train id "
                                         f"outside --num-classes {args.num_classes}: see its error line")
    return void_processes

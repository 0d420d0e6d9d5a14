"""Validation during training (train.py ``--val-every``): the current model scored on a labelled list as evaluate.py
scores a snapshot (the dataset's evaluation mode: sliding tiles or the whole image; one confusion matrix per
process, summed over the processes), and the best score so far, which the snapshots carry so that a resumed run
keeps the best snapshot an uninterrupted run keeps."""
import math
from typing import Optional

import torch
import torch.distributed as dist

from dataset.registry import get_dataset
from dataset.segmentation import DataError
from engine.evaluation import InferenceMode, evaluate_share
from engine.inference_model import InferenceModel
from utils.cli import check_pixels
from utils.distributed import all_reduce_sum
from utils.metrics import scores_from_confusion

# The scores logged after each validation (TensorBoard ``val/<name>``, CSV ``val_<name>``), fractions in [0, 1].
VALIDATION_SCORES = ("miou", "pixel_acc", "mean_acc")


class Validation:
    """``args`` (train.py's: val_every, val_list, dataset, data_dir, clip_length, frame_stride, num_classes,
    num_workers, max_pixels) made a validation of the list ``args.val_list``, every listed file checked here
    (``DataError`` naming the list: before the first step). The model runs in ``channels_last`` and under autocast ``amp_dtype`` (None: float32), as the
    training does.

    :meth:`due` says when to validate; :meth:`run` scores the model (a collective: every process calls it);
    :meth:`improves` and :meth:`record_best` keep the best mIoU, :meth:`state_dict` / :meth:`load_state_dict` carry it
    through the snapshots."""

    def __init__(self, args, device: torch.device, channels_last: bool, amp_dtype: Optional[torch.dtype]):
        spec = get_dataset(args.dataset)
        self.every = args.val_every
        self.list_path = args.val_list
        # every listed file checked (a video run's clips: every frame)
        self.dataset = spec.dataset(args.data_dir, args.val_list, clip_length=args.clip_length,
                                    frame_stride=args.frame_stride, training=False)
        if self.dataset.entries[0].label_path is None:
            raise DataError(f"--val-list {args.val_list}: image-only lines, no labels to score against: list "
                            "'<image>\\t<label>' lines")
        evaluation = spec.evaluation
        self.mode = InferenceMode(None if evaluation.whole else tuple(evaluation.input_size),
                                  max_pixels=args.max_pixels, flip_pairs=spec.flip_pairs)
        if self.mode.tile_size is not None:
            check_pixels(f"--val-every: the {args.dataset} validation tiles",
                         *self.mode.tile_size, args.max_pixels)
        self.device = device
        self.channels_last = channels_last
        self.amp_dtype = amp_dtype
        self.num_classes = args.num_classes
        self.num_workers = args.num_workers
        self.best_miou: Optional[float] = None
        self.best_iteration: Optional[int] = None

    def describe(self) -> str:
        return f"validation every {self.every} iterations on {self.list_path} ({len(self.dataset)} images, " \
               f"{self.mode.describe()})"

    def due(self, done: int, num_steps: int) -> bool:
        """Whether to validate after ``done`` steps: every ``--val-every`` and at the end."""
        return done % self.every == 0 or done == num_steps

    def run(self, model: torch.nn.Module, rank: int, world_size: int) -> dict:
        """Score ``model`` (the bare module, not the DistributedDataParallel wrapper: the processes' shares differ
        in size) on this process's share of the list, in eval mode and back in the mode it was in (cuDNN's
        autotuning off for whole images of many sizes, and back on); rank 0's buffers (batch-norm statistics) first
        copied to every process, as DistributedDataParallel's next forward does anyway, so that the score is that
        of rank 0's model, the one saved. Returns ``{name: score}`` for :data:`VALIDATION_SCORES` (NaN where
        undefined), the same on every process."""
        if world_size > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        was_training, benchmark = model.training, torch.backends.cudnn.benchmark
        # whole images come in many sizes: cuDNN would autotune its convolutions anew for each (the tiles: once)
        torch.backends.cudnn.benchmark = benchmark and self.mode.tile_size is not None
        try:
            runner = InferenceModel(model, self.channels_last, self.amp_dtype).eval()
            conf = evaluate_share(runner, self.dataset, self.device, self.mode, self.num_classes, rank, world_size,
                                  num_workers=self.num_workers)
        finally:
            model.train(was_training)
            torch.backends.cudnn.benchmark = benchmark
        scores = scores_from_confusion(all_reduce_sum(conf))
        return {"miou": scores.mean_iou, "pixel_acc": scores.pixel_accuracy, "mean_acc": scores.mean_accuracy}

    def improves(self, miou: float) -> bool:
        """Whether ``miou`` beats the best so far (a NaN never does; the first defined one always does)."""
        return not math.isnan(miou) and (self.best_miou is None or miou > self.best_miou)

    def record_best(self, miou: float, iteration: int) -> None:
        self.best_miou, self.best_iteration = miou, iteration

    def state_dict(self) -> dict:
        """``{"best_miou": float or None, "best_iteration": int or None}``: what a snapshot carries."""
        return {"best_miou": self.best_miou, "best_iteration": self.best_iteration}

    def load_state_dict(self, state: dict) -> None:
        """The best score so far from a snapshot's ``validation`` (``{}``: none yet)."""
        self.best_miou, self.best_iteration = state.get("best_miou"), state.get("best_iteration")

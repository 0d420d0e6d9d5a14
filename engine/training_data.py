"""The training batches: the dataset's loader split over the processes, and an endless stream of batches that starts
where an uninterrupted run would be at a given iteration (what makes ``--resume`` exact)."""
import torch
from torch.utils.data import DataLoader

from dataset.registry import get_dataset
from dataset.sampler import ResumableDistributedSampler
from dataset.segmentation import worker_init_fn


class TooFewSamplesError(ValueError):
    """The list holds fewer samples than one global batch needs; the message names ``--data-list``."""


class TrainingBatches:
    """``args`` (train.py's: dataset, data_dir, data_list, clip_length, frame_stride, input_size, random_scale,
    random_mirror, ignore_label, random_seed, batch_size, num_workers) made a loader for process ``rank`` of
    ``world_size``: ``batch_size // world_size`` samples each, the last incomplete batch of an epoch dropped.

    ``iterate(start_iteration)`` yields ``(images (N, 3, H, W) float32 -- clips (N, T, 3, H, W) when clip_length T >
    1 --, labels (N, H, W) int64 (of the centre frames), names)`` forever,
    from the batch that iteration ``start_iteration`` (0-based) of an uninterrupted run takes."""

    def __init__(self, args, rank: int, world_size: int, device: torch.device):
        self.dataset = get_dataset(args.dataset).dataset(
            args.data_dir, args.data_list, clip_length=args.clip_length, frame_stride=args.frame_stride,
            crop_size=tuple(args.input_size), scale=args.random_scale, mirror=args.random_mirror,
            ignore_label=args.ignore_label, training=True, seed=args.random_seed)
        per_process = args.batch_size // world_size
        self.sampler = ResumableDistributedSampler(self.dataset, num_replicas=world_size, rank=rank,
                                                   seed=args.random_seed)
        self.iterations_per_epoch = len(self.sampler) // per_process
        if self.iterations_per_epoch == 0:
            raise TooFewSamplesError(f"--data-list {args.data_list} has {len(self.dataset)} samples: too few for a "
                                     f"global batch of {args.batch_size} over {world_size} processes")
        self.loader = DataLoader(self.dataset, batch_size=per_process, sampler=self.sampler,
                                 num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                                 worker_init_fn=worker_init_fn,
                                 generator=torch.Generator().manual_seed(args.random_seed))

    def __len__(self) -> int:
        """The number of samples in the list."""
        return len(self.dataset)

    def iterate(self, start_iteration: int):
        """Endless batches, starting where iteration ``start_iteration`` of an uninterrupted run would; ``close()``
        the generator to shut the loader's workers down."""
        epoch, batch_in_epoch = divmod(start_iteration, self.iterations_per_epoch)
        while True:
            self.sampler.set_epoch(epoch, start=batch_in_epoch * self.loader.batch_size)
            self.dataset.set_epoch(epoch)
            yield from self.loader
            epoch, batch_in_epoch = epoch + 1, 0

"""A DistributedSampler that can start an epoch part-way through, so a resumed run sees the same batches."""
from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled with ``seed + epoch``) whose epoch may start at sample ``start``.

    ``set_epoch(epoch, start)`` selects the epoch's permutation and skips this process's first ``start``
    samples of it: after ``i`` iterations of a per-process batch ``b``, ``set_epoch(epoch, (i % per_epoch) * b)``
    yields exactly the samples the uninterrupted run would still draw in that epoch. Also works without a
    process group when ``num_replicas`` and ``rank`` are given.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must lie in [0, {self.num_samples}], got {start}")
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start

"""Time train.py's data loading: Cityscapes-size PNGs through the full training augmentation, per worker process and
through a DataLoader with several workers.

    python -m benchmarks.data_loader                          # 8 generated 2048x1024 scenes; 1, 2, 4, ... workers
    python -m benchmarks.data_loader --data-dir cityscapes --data-list dataset/list/cityscapes/train.lst   # real data
    python -m benchmarks.data_loader --height 256 --width 512 --crop 129 --workers 0,2   # a quick look

The samples are train.py's: Cityscapes' ``dataset.segmentation.SegmentationDataset`` with random scale (0.7-2.1),
random mirror and the ``--crop`` random crop, i.e. decoding the image and label PNGs, mapping the label ids, resizing, subtracting the
mean, padding, cropping, flipping and making tensors. Without ``--data-dir``, ``--images`` scenes of ``dataset.
generate_demo`` are written to a temporary folder first (their noisy textures make PNGs of about 4 MB, which decode
slower than the ~2 MB photographs of Cityscapes: a pessimistic stand-in).

Two tables: (1) one process, one thread (what each DataLoader worker does): milliseconds per sample of the whole
``__getitem__`` and of decoding its two PNGs alone (``cv2.imread``), median of ``--samples``; (2) a DataLoader
(``--batch-size`` per batch, random order with replacement, ``worker_init_fn`` of train.py: one OpenCV thread per
worker, pinned memory where a GPU is visible) for each ``--workers`` count: images/s over ``--batches-per-worker``
x workers batches after the first batch (worker start-up not counted), and that per worker. Prints Markdown;
``--output`` also writes it to a file.
"""
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import List, Optional

import cv2
import torch
from torch.utils.data import DataLoader, RandomSampler

from benchmarks.measure import write_lines
from dataset.cityscapes import CITYSCAPES
from dataset.segmentation import SegmentationDataset, worker_init_fn
from dataset.generate_demo import generate
from utils.cli import EXIT_OK, ArgumentParser, csv_of, parse_non_negative_int, parse_positive_int, parse_size


def default_workers() -> List[int]:
    """1, 2, 4, 8, 16 as far as the machine has cores."""
    cores = os.cpu_count() or 1
    return [count for count in (1, 2, 4, 8, 16) if count <= cores] or [1]


def parse_args(argv=None):
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="a Cityscapes folder to read (default: generated scenes)")
    parser.add_argument("--data-list", default=None, help="with --data-dir: its list file of '<image>\\t<label>'")
    parser.add_argument("--images", type=parse_positive_int, default=8, help="scenes to generate")
    parser.add_argument("--height", type=parse_positive_int, default=1024, help="of the generated scenes")
    parser.add_argument("--width", type=parse_positive_int, default=2048, help="of the generated scenes")
    parser.add_argument("--crop", type=parse_size, default=(769, 769), help="training crop: SIZE or H,W")
    parser.add_argument("--workers", type=csv_of(parse_non_negative_int), default=default_workers(),
                        help="DataLoader worker counts, comma-separated (0: in the main process)")
    parser.add_argument("--batch-size", type=parse_positive_int, default=2, help="samples per batch (per GPU)")
    parser.add_argument("--batches-per-worker", type=parse_positive_int, default=6,
                        help="timed batches per worker (at least 6 batches in all)")
    parser.add_argument("--samples", type=parse_positive_int, default=8, help="samples timed in one process")
    parser.add_argument("--output", default=None, help="also write the Markdown tables to this file")
    args = parser.parse_args(argv)
    if (args.data_dir is None) != (args.data_list is None):
        parser.error("--data-dir and --data-list go together")
    return args


def _dataset(root: str, list_path: str, crop) -> SegmentationDataset:
    return CITYSCAPES.dataset(root, list_path, crop_size=tuple(crop), scale=True, mirror=True, training=True, seed=0)


def one_process_table(dataset: SegmentationDataset, samples: int) -> str:
    """Milliseconds per sample in this process with one OpenCV thread: the whole sample, and decoding alone."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        whole, decode = [], []
        for index in range(samples):
            entry = dataset.entries[index % len(dataset)]
            start = time.perf_counter()
            cv2.imread(entry.image_path, cv2.IMREAD_COLOR)
            cv2.imread(entry.label_path, cv2.IMREAD_UNCHANGED)
            decode.append(time.perf_counter() - start)
            start = time.perf_counter()
            dataset[index % len(dataset)]
            whole.append(time.perf_counter() - start)
    finally:
        cv2.setNumThreads(threads)
    sample, png = 1000 * statistics.median(whole), 1000 * statistics.median(decode)
    return "\n".join([
        "| one process, one thread | ms per sample | samples/s |", "|---|---|---|",
        f"| the whole training sample | {sample:.1f} | {1000 / sample:.1f} |",
        f"| of which decoding the image and label PNGs | {png:.1f} ({100 * png / sample:.0f}%) | |",
        f"| the rest: label ids and checks, scale, mean, pad, crop, flip, tensors | {sample - png:.1f} | |",
    ])


def loader_rate(dataset: SegmentationDataset, workers: int, batch_size: int, batches: int) -> float:
    """Images/s of a DataLoader with ``workers`` processes over ``batches`` batches after the first one."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=(batches + 1) * batch_size,
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True, worker_init_fn=worker_init_fn)
    threads = cv2.getNumThreads()
    if workers == 0:
        cv2.setNumThreads(1)
    try:
        iterator = iter(loader)
        next(iterator)  # the workers have started and delivered
        start = time.perf_counter()
        count = sum(images.shape[0] for images, _, _ in iterator)
        return count / (time.perf_counter() - start)
    finally:
        cv2.setNumThreads(threads)


def loader_table(dataset: SegmentationDataset, worker_counts: List[int], batch_size: int,
                 batches_per_worker: int) -> str:
    lines = ["| workers | images/s | images/s per worker |", "|---|---|---|"]
    rates = {}
    for workers in worker_counts:
        rates[workers] = loader_rate(dataset, workers, batch_size, max(batches_per_worker * workers, 6))
        per_worker = rates[workers] / max(workers, 1)
        lines.append(f"| {workers}{' (main process)' if workers == 0 else ''} | {rates[workers]:.1f} | "
                     f"{per_worker:.1f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    most = max(worker_counts)
    if most > 0:
        per_worker = rates[most] / most
        lines += ["", f"At the {per_worker:.1f} images/s per worker of {most} workers, 100 images/s needs about "
                      f"{-(-100 // per_worker):.0f} worker(s) in all."]
    return "\n".join(lines)


def run(args, root: str, list_path: str, source: str) -> str:
    dataset = _dataset(root, list_path, args.crop)
    crop_h, crop_w = args.crop
    title = (f"Data loading of train.py's training samples (random scale 0.7-2.1, mirror, {crop_h}x{crop_w} crop) "
             f"from {source}, on {os.cpu_count()} CPU cores ({platform.machine()}), torch "
             f"{torch.__version__}, OpenCV {cv2.__version__}; batches of {args.batch_size}.")
    return "\n".join([title, "", one_process_table(dataset, args.samples), "",
                      loader_table(dataset, args.workers, args.batch_size, args.batches_per_worker)])


def main(argv: Optional[List[str]] = None) -> int:
    """Exit codes: 0 done, 2 bad command line."""
    args = parse_args(argv)
    if args.data_dir is not None:
        report = run(args, args.data_dir, args.data_list, f"{args.data_list}")
    else:
        with tempfile.TemporaryDirectory(prefix="ccnet_loader_") as root:
            start = time.perf_counter()
            lists = generate(root, args.images, 0, args.height, args.width, seed=0)
            seconds = time.perf_counter() - start
            print(f"generated {args.images} scenes of {args.height}x{args.width} in {seconds:.1f} s", file=sys.stderr,
                  flush=True)
            report = run(args, root, lists["train"], f"{args.images} generated {args.width}x{args.height} PNG scenes")
    print(report)
    write_lines(args.output, [report])
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Every dataset the scripts know, by its ``--dataset`` name: add a new dataset's spec (``dataset.spec``) here.

    python -m dataset.registry NAME     # NAME's training numbers on one line, for run_local.sh

prints the learning rate, weight decay, batch size, number of steps and crop size ``H,W`` that train.py takes for
the dataset, separated by spaces.
"""
import sys
from typing import Callable, Dict

from dataset.ade20k import ADE20K
from dataset.camvid import CAMVID
from dataset.cityscapes import CITYSCAPES
from dataset.lip import LIP
from dataset.spec import DatasetSpec
from utils.cli import EXIT_OK, ArgumentParser

DATASETS: Dict[str, DatasetSpec] = {spec.name: spec for spec in (CITYSCAPES, ADE20K, LIP, CAMVID)}
DATASET_NAMES = tuple(DATASETS)
DEFAULT_DATASET = CITYSCAPES.name


def get_dataset(name: str) -> DatasetSpec:
    """The spec of the dataset called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
    return DATASETS[name]


def per_dataset(value: Callable[[DatasetSpec], object]) -> str:
    """``"769,769 (cityscapes), 512,512 (ade20k)"``: ``value(spec)`` for every dataset (sizes as ``H,W``), for a
    help text."""
    def show(item) -> str:
        return ",".join(map(str, item)) if isinstance(item, tuple) else str(item)
    return ", ".join(f"{show(value(spec))} ({name})" for name, spec in DATASETS.items())


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 bad command line (an unknown dataset among them)."""
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=DATASET_NAMES, help="the dataset")
    training = get_dataset(parser.parse_args(argv).name).training
    print(training.learning_rate, training.weight_decay, training.batch_size, training.num_steps,
          ",".join(map(str, training.input_size)))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

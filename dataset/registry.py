"""Every dataset the scripts know, by its ``--dataset`` name: add a new dataset's spec (``dataset.spec``) here."""
from typing import Callable, Dict

from dataset.ade20k import ADE20K
from dataset.cityscapes import CITYSCAPES
from dataset.spec import DatasetSpec

DATASETS: Dict[str, DatasetSpec] = {spec.name: spec for spec in (CITYSCAPES, ADE20K)}
DATASET_NAMES = tuple(DATASETS)
DEFAULT_DATASET = CITYSCAPES.name


def get_dataset(name: str) -> DatasetSpec:
    """The spec of the dataset called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
    return DATASETS[name]


def per_dataset(value: Callable[[DatasetSpec], object]) -> str:
    """``"cityscapes 769,769; ade20k 512,512"``: ``value(spec)`` for every dataset (sizes as ``H,W``), for a help
    text."""
    def show(item) -> str:
        return ",".join(map(str, item)) if isinstance(item, tuple) else str(item)
    return "; ".join(f"{name} {show(value(spec))}" for name, spec in DATASETS.items())


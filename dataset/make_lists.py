"""Write a dataset's list files (the original CCNet format) from a copy of the dataset.

    python -m dataset.make_lists DATA_DIR [--dataset cityscapes|ade20k|lip|camvid] [--out-dir dataset/list/<dataset>]

Each dataset's layout and lists are in its spec (``dataset/cityscapes.py``, ``dataset/ade20k.py``,
``dataset/lip.py``, ``dataset/camvid.py``): e.g. Cityscapes gives ``train.lst`` (2975 lines on the full dataset),
``val.lst`` (500), ``trainval.lst`` (3475) and ``test.lst`` (1525); ADE20K ``train.lst`` (20210), ``val.lst`` (2000)
and ``trainval.lst``; LIP ``train.lst`` (30462), ``val.lst`` (10000) and ``trainval.lst``; CamVid ``train.lst``
(367), ``val.lst`` (101), ``test.lst`` (233, labelled too) and ``trainval.lst``. Lines are ``<image>\\t<label>`` (or
``<image>`` for a test list), paths relative to DATA_DIR, sorted. A list without images is skipped with a warning; a
folder without the dataset's layout, or an image without its label, is an error.
"""
import os
import sys
from typing import Dict, Optional

from dataset.registry import DATASET_NAMES, DEFAULT_DATASET, get_dataset
from utils.cli import EXIT_OK, ArgumentParser, report_failure


def make_lists(root: str, out_dir: Optional[str] = None, dataset: str = DEFAULT_DATASET) -> Dict[str, int]:
    """Write the list files of the ``dataset`` folder ``root`` to ``out_dir`` (default: the dataset's
    ``dataset/list/<name>``); returns ``{list name: number of lines}`` for those written."""
    spec = get_dataset(dataset)
    out_dir = out_dir or spec.list_dir
    lists = spec.list_lines(root)
    if lists["train"] and lists["val"]:
        lists["trainval"] = lists["train"] + lists["val"]
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, lines in lists.items():
        if not lines:
            print(f"warning: no {name} images in {root}; {name}.lst not written", file=sys.stderr)
            continue
        with open(os.path.join(out_dir, f"{name}.lst"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        written[name] = len(lines)
    return written


def main(argv=None) -> int:
    """Exit codes: 0 done, 1 not a folder of the dataset or a label missing (one line on stderr), 2 bad command
    line."""
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the dataset's folder (Cityscapes: holds leftImg8bit/ and gtFine/; ADE20K: "
                                     "ADEChallengeData2016, holds images/ and annotations/; LIP: holds "
                                     "TrainVal_images/ and TrainVal_parsing_annotations/; "
                                     "CamVid: holds train/ and trainannot/, val/, test/, ...)")
    parser.add_argument("--dataset", choices=DATASET_NAMES, default=DEFAULT_DATASET, help="which dataset it is")
    parser.add_argument("--out-dir", default=None, help="where to write the .lst files (default: dataset/list/"
                                                        "<dataset>)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or get_dataset(args.dataset).list_dir
    try:
        written = make_lists(args.root, out_dir, args.dataset)
    except FileNotFoundError as error:
        return report_failure(error)
    for name, count in written.items():
        print(f"{os.path.join(out_dir, name + '.lst')}: {count} lines")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

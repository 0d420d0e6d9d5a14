"""Write the Cityscapes list files (the original CCNet format) from a Cityscapes folder.

    python -m dataset.make_lists CS_ROOT [--out-dir dataset/list/cityscapes]

CS_ROOT holds ``leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/*_gtFine_labelIds.png``. Writes ``train.lst`` (2975 lines on the full dataset),
``val.lst`` (500), ``trainval.lst`` (train then val, 3475) as ``<image>\\t<label>`` and ``test.lst`` (1525) as
``<image>``, paths relative to CS_ROOT, sorted. A split whose images are absent is skipped with a warning; an image
of train/val without its label is an error.
"""
import glob
import os
import sys

from utils.cli import EXIT_OK, ArgumentParser, report_failure

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "list", "cityscapes")


def split_lines(root: str, split: str, with_labels: bool) -> list[str]:
    """Sorted list lines of one split: ``<image>\\t<label>`` or ``<image>``, relative to ``root``."""
    pattern = os.path.join(root, "leftImg8bit", split, "*", "*" + IMAGE_SUFFIX)
    lines = []
    for image_path in sorted(glob.glob(pattern)):
        image = os.path.relpath(image_path, root).replace(os.sep, "/")
        if not with_labels:
            lines.append(image)
            continue
        city = os.path.basename(os.path.dirname(image_path))
        stem = os.path.basename(image_path)[:-len(IMAGE_SUFFIX)]
        label = f"gtFine/{split}/{city}/{stem}{LABEL_SUFFIX}"
        if not os.path.isfile(os.path.join(root, label)):
            raise FileNotFoundError(f"label missing for {image}: {os.path.join(root, label)}")
        lines.append(f"{image}\t{label}")
    return lines


def make_lists(root: str, out_dir: str = DEFAULT_OUT_DIR) -> dict[str, int]:
    """Write the four list files; returns ``{list name: number of lines}`` for those written."""
    if not os.path.isdir(os.path.join(root, "leftImg8bit")):
        raise FileNotFoundError(f"not a Cityscapes folder (no leftImg8bit/ inside): {root}")
    splits = {"train": split_lines(root, "train", True), "val": split_lines(root, "val", True),
              "test": split_lines(root, "test", False)}
    if splits["train"] and splits["val"]:
        splits["trainval"] = splits["train"] + splits["val"]
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, lines in splits.items():
        if not lines:
            print(f"warning: no images in {os.path.join(root, 'leftImg8bit', name)}; {name}.lst not written",
                  file=sys.stderr)
            continue
        with open(os.path.join(out_dir, f"{name}.lst"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        written[name] = len(lines)
    return written


def main(argv=None) -> int:
    """Exit codes: 0 done, 1 not a Cityscapes folder or a label missing (one line on stderr), 2 bad command line."""
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("root", help="Cityscapes folder holding leftImg8bit/ and gtFine/")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where to write the .lst files")
    args = parser.parse_args(argv)
    try:
        written = make_lists(args.root, args.out_dir)
    except FileNotFoundError as error:
        return report_failure(error)
    for name, count in written.items():
        print(f"{os.path.join(args.out_dir, name + '.lst')}: {count} lines")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: the repository root, generated demo datasets, the devices to test on, the CI flag, a script
run that must fail, and the markers of pytest.ini (``slow``; ``extra(name)``: needs an optional package)."""
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dataset.generate_demo import generate
from utils.cli import EXIT_FAILURE

REPO_ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# How to get each optional package that an ``extra(name)`` marker names.
EXTRAS = {"inplace_abn": "`make inplace-abn`", "cityscapesscripts": "requirements-dev.txt",
          "onnxruntime": "requirements-dev.txt", "onnxscript": "requirements-dev.txt"}


@dataclass(frozen=True)
class DemoData:
    """A generated dataset (Cityscapes or ADE20K format): the data dir and its two list files."""

    root: str
    train_list: str
    val_list: str

    def training_argv(self, snapshot_dir, *extra: str, steps: int = 4) -> list:
        """train.py's command line for ``steps`` CPU steps of the tiny CCNet (BatchNorm, 48x96 crops, batch 2, no
        ImageNet weights, no workers) on this data, snapshots to ``snapshot_dir``; ``extra`` flags appended."""
        return ["--data-dir", self.root, "--data-list", self.train_list, "--backbone", "tiny", "--norm", "bn",
                "--gpu", "cpu", "--input-size", "48,96", "--batch-size", "2", "--num-steps", str(steps),
                "--num-workers", "0", "--restore-from", "", "--snapshot-dir", str(snapshot_dir), *extra]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def in_ci() -> bool:
    """Whether the tests run in CI (``CI=true``): there an optional package that is missing is a failure."""
    return IN_CI


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """``demo_data(num_train, num_val, height, width, seed=0, dataset="cityscapes") -> DemoData``: scenes of
    ``dataset.generate_demo`` in the format of ``dataset``, generated once per session for each set of arguments.
    Shared: a test that changes files works on a copy."""
    made = {}

    def make(num_train: int, num_val: int, height: int, width: int, seed: int = 0,
             dataset: str = "cityscapes") -> DemoData:
        key = (num_train, num_val, height, width, seed, dataset)
        if key not in made:
            root = tmp_path_factory.mktemp("demo_data")
            lists = generate(str(root), num_train, num_val, height, width, seed, dataset)
            made[key] = DemoData(str(root), lists["train"], lists["val"])
        return made[key]

    return make


@pytest.fixture(scope="session")
def training_demo(demo_data) -> DemoData:
    """6 + 1 generated 64x128 scenes (Cityscapes format): what the training tests train the tiny CCNet on."""
    return demo_data(num_train=6, num_val=1, height=64, width=128, seed=0)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
def device(request) -> torch.device:
    """Each device to test on: the CPU always, CUDA when a GPU is visible."""
    return torch.device(request.param)


@pytest.fixture
def failed_run(capsys):
    """``failed_run(main, argv) -> message``: call a script's ``main`` that must fail; checks the exit code (1) and
    that stderr ends with the one line ``<script>: error: <message>``."""
    def run(main, argv) -> str:
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        assert code == EXIT_FAILURE, err[-2000:]
        last_line = err.strip().splitlines()[-1]
        prefix = f"{os.path.basename(sys.argv[0])}: error: "
        assert last_line.startswith(prefix), last_line
        return last_line[len(prefix):]

    return run


def pytest_runtest_setup(item):
    """``extra(name)``: skip without the optional package ``name``, except in CI, where a skip would hide a
    failure (CI installs every extra)."""
    for marker in item.iter_markers("extra"):
        name = marker.args[0]
        try:
            importlib.import_module(name)
        except ImportError:
            message = f"the optional package {name} is not installed ({EXTRAS[name]})"
            if IN_CI:
                pytest.fail(f"CI=true but {message}")
            pytest.skip(message)

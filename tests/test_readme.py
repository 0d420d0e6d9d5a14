"""The README as a newcomer follows it: the environment is activated before the Quick-start's commands, and the
"use the op in your model" code runs as printed."""
import re
from pathlib import Path

import pytest
import torch

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the README's ``## <title>`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README.md has no section '## {title}'"
    return match.group(1)


def code_blocks(text: str, language: str):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_set_up_names_the_prerequisites_and_the_cpu_build():
    set_up = section("Set-up")
    for needed in ("Python 3.10", "`make`", "`g++`", "`nvcc`", "--index-url https://download.pytorch.org/whl/cpu"):
        assert needed in set_up, needed


def test_the_quick_start_activates_the_environment_first():
    commands = [line.split("#")[0].strip() for line in code_blocks(section("Quick start"), "bash")[0].splitlines()]
    commands = [command for command in commands if command]
    assert commands[0] == ". .venv/bin/activate"
    assert any(command.startswith("python ") for command in commands[1:])  # what needs the environment


@pytest.mark.slow  # a cold torch.compile of the block: about 17 s on the 2-core development CPU
def test_the_op_section_runs_as_printed():
    (code,) = code_blocks(section("Use the op in your model"), "python")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    block, x, y = namespace["block"], namespace["x"], namespace["y"]
    assert y.shape == x.shape == (2, 64, 33, 45)
    assert x.grad is not None and block.gamma.grad is not None
    torch.testing.assert_close(y, block(x))  # the compiled block computes what the block does

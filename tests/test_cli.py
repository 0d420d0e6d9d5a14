"""The command line: the argument validators of utils.cli, and every script's one-line usage error (exit code 2)."""
import argparse
import importlib

import pytest

from utils.cli import (EXIT_USAGE, csv_choices, csv_of, parse_auto_bool, parse_bool, parse_fraction,
                       parse_non_negative_int, parse_point, parse_positive_float, parse_positive_int, parse_scales,
                       parse_size)

SCRIPTS = ("train", "evaluate", "predict", "visualize_attention", "dataset.generate_demo", "dataset.make_lists",
           "dataset.registry", "utils.plot_log", "export_onnx", "benchmarks.cc_attention_op", "benchmarks.model_report",
           "benchmarks.train_step", "benchmarks.inference", "benchmarks.data_loader", "benchmarks.onnx_latency")


@pytest.mark.parametrize("parse, text, value", [
    (parse_size, "769", (769, 769)), (parse_size, "512,1024", (512, 1024)), (parse_size, "64x128", (64, 128)),
    (parse_scales, "0.75,1.0,1.25", [0.75, 1.0, 1.25]), (parse_point, "10,0", (10, 0)),
    (parse_positive_int, "3", 3), (parse_non_negative_int, "0", 0), (parse_positive_float, "0.5", 0.5),
    (parse_fraction, "1", 1.0), (parse_bool, "YES", True), (parse_bool, "0", False),
    (csv_choices(("off", "bf16", "fp16")), "off,fp16", ["off", "fp16"]),
    (parse_auto_bool, "AUTO", None), (parse_auto_bool, "1", True), (parse_auto_bool, "false", False),
    (csv_of(parse_positive_int), "2,8", [2, 8]), (csv_of(parse_bool), "0,1", [False, True]),
])
def test_validators_accept(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse, text, message", [
    (parse_size, "769,0", "expected a size H,W"), (parse_size, "1,2,3", "expected a size H,W"),
    (parse_scales, "1,a", "comma-separated numbers"), (parse_scales, "1,0", "positive"),
    (parse_point, "3", "'y,x'"), (parse_point, "-1,4", ">= 0"),
    (parse_positive_int, "0", "integer >= 1"), (parse_positive_int, "1.5", "integer >= 1"),
    (parse_non_negative_int, "-1", "integer >= 0"), (parse_positive_float, "0", "number > 0"),
    (parse_fraction, "1.2", "in [0, 1]"), (parse_bool, "maybe", "0/1"),
    (csv_choices(("off", "bf16")), "off,fp8", "unknown fp8; choose from off, bf16"),
    (parse_auto_bool, "2", "auto, 0 or 1"), (csv_of(parse_positive_int), "2,0", "integer >= 1"),
])
def test_validators_refuse_with_what_was_expected(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(text)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_reports_a_bad_command_line_in_one_line(script, capsys):
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--no-such-flag"])
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USAGE
    assert len(err.strip().splitlines()) == 1 and ": error: " in err and err.strip().endswith("(see --help)")

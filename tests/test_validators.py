"""The command line's flags (plumbing/validators.py, the parsers): each bad value is one argparse error line."""

import pytest
import torch

import blockwise_kd
import lfcc
from plumbing import validators
from conftest import SCRIPTS, make_args, parser_error

SHARED_BAD = [
    ("--epochs", "0", "a positive integer"), ("--epochs", "-3", "a positive integer"),
    ("--epochs", "2.5", "a positive integer"), ("--batch-size", "0", "a positive integer"),
    ("--batch-size", "-5", "a positive integer"), ("--train-subset", "-100", "an integer >= 0"),
    ("--lr", "0", "a positive number"), ("--lr", "nan", "a positive number"), ("--lr", "inf", "a positive number"),
    ("--momentum", "1", "a number in [0, 1)"), ("--momentum", "-0.1", "a number in [0, 1)"),
    ("--weight-decay", "-0.0005", "a number >= 0"), ("--milestones", "0", "a positive integer"),
    ("--lr-decay", "0", "a positive number"), ("--warmup-epochs", "-1", "a number >= 0"),
    ("--label-smoothing", "1", "a number in [0, 1)"), ("--grad-clip", "-1", "a number >= 0"),
    ("--seed", "-1", "an integer in 0..4294967295"), ("--eval-every", "0", "a positive integer"),
    ("--seed", "1000000000000000", "an integer in 0..4294967295"),  # overflowed torch's generator seed
    ("--seed", "4294967296", "an integer in 0..4294967295"),
    ("--log-every", "-1", "a number >= 0"),
]

METHOD_BAD = [
    ("blockwise_kd", "--teacher-epochs", "0", "a positive integer"),
    ("sskd", "--teacher-epochs", "-1", "a positive integer"),
    ("lfcc", "--teacher-epochs", "0", "a positive integer"),
    ("blockwise_kd", "--kd-temperature", "0", "a positive number"),
    ("blockwise_kd", "-T", "-4", "a positive number"),
    ("blockwise_kd", "--alpha", "-1", "a number >= 0"),
    ("blockwise_kd", "--beta", "-0.5", "a number >= 0"),
    ("blockwise_kd", "--gamma", "nan", "a number >= 0"),
    ("blockwise_kd", "--ramp-epochs", "-1", "a number >= 0"),
    ("sskd", "--stage-epochs", "0", "a positive integer"),
    ("sskd", "--head-epochs", "-1", "a positive integer"),
    ("sskd", "--feat-weight", "0", "a positive number"),
    ("lfcc", "--scales", "0", "a positive integer"),
    ("lfcc", "--proj-dim", "0", "a positive integer"),
    ("lfcc", "--reduce-channels", "-1", "an integer >= 0"),
    ("lfcc", "--tau", "0", "a positive number"),
    ("lfcc", "--alpha", "-1", "a number >= 0"),
    ("lfcc", "--beta", "-1", "a number >= 0"),
    ("lfcc", "--kd-temperature", "0", "a positive number"),
    ("lfcc", "-T", "-2", "a positive number"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag, value, wanted", SHARED_BAD)
def test_bad_shared_number_is_a_parser_error(script, flag, value, wanted, nothing_runs, capsys):
    line = parser_error(script, ["--dataset", "synthetic", flag, value], capsys)
    assert line.endswith(f"error: argument {flag}: must be {wanted}, not '{value}'"), line


@pytest.mark.parametrize("script, flag, value, wanted", METHOD_BAD)
def test_bad_method_number_is_a_parser_error(script, flag, value, wanted, nothing_runs, capsys):
    argv = ["--dataset", "synthetic", flag, value] if flag != "--scales" else ["--scales", "1", value]
    line = parser_error(script, argv, capsys)
    name = {"-T": "--kd-temperature/-T", "--kd-temperature": "--kd-temperature/-T"}.get(flag, flag)  # argparse names an alias with it
    assert line.endswith(f"error: argument {name}: must be {wanted}, not '{value}'"), line


def test_edge_values_that_are_allowed():
    args = make_args("--train-subset", 0, "--seed", 0, "--momentum", 0, "--weight-decay", 0, "--warmup-epochs", 0,
                     "--label-smoothing", 0, "--grad-clip", 0, "--log-every", 0, "--lr", "1e-3",
                     "--milestones", 1, 2, "--epochs", 1, "--batch-size", 1, method_args=blockwise_kd.add_args)
    assert (args.train_subset, args.seed, args.epochs, args.batch_size, args.milestones) == (0, 0, 1, 1, [1, 2])
    assert isinstance(args.epochs, int) and isinstance(args.lr, float) and args.lr == 1e-3
    args = make_args("--alpha", 0, "--beta", 0, "--gamma", 0, "--ramp-epochs", 0, method_args=blockwise_kd.add_args)
    assert (args.alpha, args.beta, args.gamma, args.ramp_epochs) == (0, 0, 0, 0)
    args = make_args("--alpha", 0, "--beta", 0, "--scales", 4, method_args=lfcc.add_args)
    assert (args.alpha, args.beta, args.scales) == (0, 0, [4])


def test_the_largest_seed_is_allowed_and_trains(synthetic_data):
    assert make_args("--seed", validators.MAX_SEED).seed == 2 ** 32 - 1
    x, y = next(synthetic_data.train_batches(8, seed=validators.MAX_SEED, epoch=10_000))  # no int64 overflow
    assert x.shape == (8, 3, 32, 32)


@pytest.mark.parametrize("flag", ["--out-dir", "--data-dir", "--checkpoint-dir", "--teacher-ckpt"])
def test_an_empty_path_is_a_parser_error(flag, nothing_runs, capsys):
    line = parser_error("blockwise_kd", ["--dataset", "synthetic", flag, ""], capsys)  # --out-dir "" meant the default
    assert line.endswith(f"error: argument {flag}: must be a path, not an empty string"), line


def test_resume_and_overwrite_together_are_a_parser_error(nothing_runs, capsys):
    line = parser_error("common", ["--dataset", "synthetic", "--resume", "--overwrite"], capsys)
    assert line.endswith("error: argument --overwrite: not allowed with argument --resume"), line


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("device, visible, wanted", [
    ("gpu", 0, "argument --device: 'gpu' is not a device; use cuda, cuda:N or cpu"),
    ("cuda", 0, "argument --device: 'cuda' is not available: no CUDA device is visible; use --device cpu"),
    ("cuda:3", 2, "argument --device: 'cuda:3' is not available: 2 CUDA device(s) are visible, cuda:0 to cuda:1"),
])
def test_unavailable_device_is_a_parser_error(script, device, visible, wanted, nothing_runs, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    line = parser_error(script, ["--dataset", "synthetic", "--device", device], capsys)
    assert line.endswith("error: " + wanted), line


def test_available_devices_parse(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert make_args("--device", "cuda:1").device == "cuda:1" and make_args("--device", "cpu").device == "cpu"

"""Bad command-line inputs end in one `error: ...` line before any data, model or teacher is touched:
argparse-level problems through parser.error (exit 2), problems found in the data through
SystemExit("error: ...") (exit 1). Most checks call the scripts' own main(argv) in-process."""
import subprocess
import sys

import pytest
import torch
from PIL import Image

import blockwise_kd
import common
from plumbing import validators
import lfcc
import sskd
from conftest import ROOT, make_args
from models import create_model

SCRIPTS = {"common": (common, ["--model", "resnet8"]), "blockwise_kd": (blockwise_kd, []),
           "sskd": (sskd, []), "lfcc": (lfcc, [])}


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a script gets as far as loading data, building a model or loading a teacher."""
    def reached(*args, **kwargs):
        pytest.fail("a bad input got past the command-line checks")
    for name in ("load_data", "build_model", "load_teacher"):
        monkeypatch.setattr(common, name, reached)


def parser_error(script, argv, capsys):
    """Run the script's main(argv); return its one error line, after checking exit code 2 and no traceback."""
    module, base = SCRIPTS[script]
    with pytest.raises(SystemExit) as exit_info:
        module.main(base + [str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def one_line_exit(error):
    """The message of a SystemExit("error: ...") (exit code 1 once it leaves the interpreter)."""
    message = error.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------ numbers

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


# ------------------------------------------------------------------------------------------ --device

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


# ------------------------------------------------------------------------------------- --train-subset

@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("subset, wanted", [
    (5, "error: --train-subset 5 is fewer than the 10 classes of synthetic"),
    (101, "error: --train-subset 101 is more than the 100 training images of synthetic"),
    (29, "error: --train-subset 29 does not split evenly over the 10 classes of synthetic: use a multiple of 10, "
         "e.g. 20 or 30"),  # it trained on 20 and recorded 29
])
def test_train_subset_outside_the_data_stops_before_any_model(script, subset, wanted, monkeypatch):
    small = common.make_synthetic(train_size=100, test_size=20)
    monkeypatch.setattr(common, "make_synthetic", lambda **size: small)
    for name in ("build_model", "load_teacher"):
        monkeypatch.setattr(common, name, lambda *a: pytest.fail("a model was built"))
    module, base = SCRIPTS[script]
    with pytest.raises(SystemExit) as error:
        module.main(base + ["--dataset", "synthetic", "--device", "cpu", "--train-subset", str(subset)])
    assert one_line_exit(error).startswith(wanted)


def test_train_subset_error_is_one_line_from_the_command_line():
    """The one place a subprocess shows more: exit code 1 and nothing but the error line on stderr."""
    done = subprocess.run([sys.executable, "common.py", "--model", "resnet8", "--dataset", "synthetic",
                           "--device", "cpu", "--train-subset", "5"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: --train-subset 5 is fewer than the 10 classes") and \
        done.stderr.count("\n") == 1, done.stderr


# -------------------------------------------------------------------------------------- image folders

def image_folder(root, train_classes=("ant", "cat"), test_classes=("ant", "cat")):
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32), (200, 10, 10)).save(root / split / cls / "a.png")
            Image.new("RGB", (32, 32), (10, 200, 10)).save(root / split / cls / "b.jpg")
    return root


def truncated_jpeg(path):
    Image.effect_noise((32, 32), 64).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def load_folder(root):
    return common.load_data(make_args("--dataset", "folder", "--data-dir", root), torch.device("cpu"))


@pytest.mark.parametrize("kind, reason", [
    ("truncated", "(cannot be decoded: "), ("text", "(not an image format Pillow can read)"), ("empty", "(empty file)"),
])
def test_unreadable_image_is_named_with_the_reason(kind, reason, tmp_path):
    root = image_folder(tmp_path)
    bad = root / "train" / "cat" / "x.jpg"
    {"truncated": truncated_jpeg, "text": lambda p: p.write_text("not an image"),
     "empty": lambda p: p.write_bytes(b"")}[kind](bad)
    with pytest.raises(SystemExit) as error:
        load_folder(root)
    assert one_line_exit(error).startswith(f"error: cannot read {bad} {reason}")
    assert "1 of the 9 image files" in str(error.value)


def test_unreadable_images_are_counted_and_the_first_named(tmp_path):
    root = image_folder(tmp_path)
    truncated_jpeg(root / "train" / "ant" / "c.jpg")
    (root / "train" / "cat" / "x.jpg").write_text("not an image")
    (root / "test" / "ant" / "y.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as error:
        load_folder(root)
    message = one_line_exit(error)
    assert message.startswith(f"error: cannot read {root / 'train' / 'ant' / 'c.jpg'} (cannot be decoded: ")
    assert f"3 of the 11 image files under {root}/ cannot be read in all" in message


@pytest.mark.parametrize("train_classes, test_classes, wanted", [
    (("ant", "cat", "dog"), ("ant", "cat"), "only in train/: dog; only in test/: none"),
    (("ant", "cat"), ("ant", "cat", "eel"), "only in train/: none; only in test/: eel"),
    (("ant", "cat", "dog"), ("ant", "eel", "fox"), "only in train/: cat, dog; only in test/: eel, fox"),
])
def test_class_lists_of_train_and_test_must_match(train_classes, test_classes, wanted, tmp_path):
    with pytest.raises(SystemExit) as error:
        load_folder(image_folder(tmp_path, train_classes, test_classes))
    assert one_line_exit(error) == f"error: {tmp_path}/train/ and {tmp_path}/test/ have different classes: {wanted}"


# ------------------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("content", ["whole model", "cut in half", "text"])
def test_unreadable_checkpoint_never_suggests_unsafe_loading(content, tmp_path):
    path = tmp_path / "teacher.pth"
    if content == "text":
        path.write_text("not a checkpoint")
    else:
        torch.save(create_model("resnet8", 10), path)  # a pickled module: weights_only loading refuses it
        if content == "cut in half":
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(SystemExit) as error:
        common.load_weights(create_model("resnet8", 10), path)
    message = one_line_exit(error)
    assert message.startswith(f"error: {path} is not a readable PyTorch checkpoint (")
    assert "weights_only" not in message and "trust" not in message
    if content == "whole model":
        assert "(UnpicklingError)" in message


# ------------------------------------------------------------------------------------------ --stones

@pytest.mark.parametrize("stones", ["4", "0", "1,x", "", "two"])
def test_bad_stones_stop_before_data_and_teacher(stones, nothing_runs, capsys):
    line = parser_error("blockwise_kd", ["--dataset", "synthetic", "--stones", stones], capsys)
    assert line.endswith(f"error: argument --stones: must be all, none or a comma list of stages 1..3, not {stones!r}"), line


def test_good_stones_pass_the_early_check(monkeypatch):
    class Reached(Exception):
        pass

    def reached(*args):
        raise Reached
    monkeypatch.setattr(common, "setup", reached)
    for stones in ("all", "none", "3,1"):
        with pytest.raises(Reached):
            blockwise_kd.main(["--stones", stones, "--student", "vit"])

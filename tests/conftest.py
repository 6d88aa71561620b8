"""Shared helpers and fixtures: flags parsed as a script would, a frozen teacher, the synthetic data and its
slices, the tiny stand-in models, one briefly trained resnet8 teacher for the whole session, and the scripts
run end to end as from the command line (one finished run of each)."""
import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import create_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

import blockwise_kd  # noqa: E402
import common  # noqa: E402
import lfcc  # noqa: E402
import models  # noqa: E402
import sskd  # noqa: E402
from models.resnet import CifarResNet  # noqa: E402
from models.token_models import mlp_mixer, vit  # noqa: E402
from models.wrn import WideResNet  # noqa: E402
from plumbing import files, runfolder  # noqa: E402

# One thread: the tests' models are tiny, and with more threads than free cores (a benchmark running beside
# the suite on a 2-core machine) the kernels spin-wait: measured there, a 2-epoch Block-KD run took 17-142 s
# with 2 threads and 5-7 s with 1.
torch.set_num_threads(1)


def replace_everywhere(monkeypatch, original, replacement):
    """monkeypatch every name bound to `original` in common, the method files and plumbing's modules (a
    function imported by name into several modules: each holds its own reference)."""
    for name, module in list(sys.modules.items()):
        if name in ("common", "blockwise_kd", "sskd", "lfcc") or name.startswith("plumbing"):
            for attr, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, attr, replacement)


def make_parser(method_args=None):
    """A method script's parser: the shared flags plus the method's own `add_args`."""
    parser = argparse.ArgumentParser()
    common.add_common_args(parser)
    common.add_distill_args(parser)
    if method_args:
        method_args(parser)
    return parser


def make_args(*argv, method_args=None):
    """Parse the shared flags (plus a method's own `add_args`) as a script would."""
    return make_parser(method_args).parse_args([str(a) for a in argv])


def frozen(model):
    """A teacher as the methods expect it: eval mode, no trainable parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def snapshot(module):
    """A copy of a module's state_dict: parameters and buffers (BatchNorm running statistics included)."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed_keys(module, before):
    """The state_dict names of `module` whose tensors differ from the `snapshot` `before`."""
    after = module.state_dict()
    assert after.keys() == before.keys()
    return {k for k, v in after.items() if not torch.equal(v, before[k])}


def train_steps(model, train_modules, loss_fn, batches, lr=0.05, progress=lambda step: 0.0):
    """Training steps as `common.fit` takes them: the optimizer over the trainable parameters of
    `train_modules` and the step from `common.prepare_training` (fp32, default memory layout), `model` in
    eval mode and `train_modules` in train mode (a frozen teacher, not among them, stays in eval mode), one
    step per (x, y) of `batches` at `progress(step)`. Returns (optimizer, the logged terms of each step)."""
    cpu = torch.device("cpu")
    recipe = {**common.RECIPES["cifar"]["cnn"], "lr": lr, "grad_clip": 0.0}
    fast = common.fast_paths(make_args("--amp", "off", "--no-channels-last"), cpu)
    optimizer, step = common.prepare_training(model, train_modules, loss_fn, recipe, fast, cpu)
    model.eval()
    for module in train_modules:
        module.train()
    terms = [step(x, y, progress(i), lr)[1] for i, (x, y) in enumerate(batches)]
    return optimizer, terms


# ------------------------------------------------------------------------------------------- models

# Small stand-ins with the zoo's structure (three stages, `stages()` and `head()`), so that a test runs in
# seconds on a CPU. 'vit' and 'mlp_mixer' keep the zoo's names: `arch` selects the token recipe (AdamW).
TINY_MODELS = {
    "narrow_resnet8": lambda n: CifarResNet(8, (8, 8, 16, 32), n),    # resnet8 at half width
    "narrower_resnet8": lambda n: CifarResNet(8, (8, 8, 12, 24), n),  # other widths than narrow_resnet8
    "wrn_10_1": lambda n: WideResNet(10, 1, n),                       # pre-activation stage outputs
    "vit": lambda n: vit(n, dim=32, depth=3, heads=2, mlp_hidden=64),
    "mlp_mixer": lambda n: mlp_mixer(n, dim=32, depth=3, token_hidden=16, channel_hidden=64),
}


def tiny_model(name, seed=None, num_classes=10):
    """A TINY_MODELS stand-in, or else the zoo model `name`, with `num_classes` classes and `arch` = name;
    initialised after torch.manual_seed(seed) when a seed is given."""
    if seed is not None:
        torch.manual_seed(seed)
    if name not in TINY_MODELS:
        return models.create_model(name, num_classes)
    model = TINY_MODELS[name](num_classes)
    model.arch = name
    return model


# --------------------------------------------------------------------------------------------- data

def data_slice(data, train, test):
    """The first `train` training and `test` test images of `data`, with its normalisation."""
    return common.Data(data.train_x[:train], data.train_y[:train], data.test_x[:test], data.test_y[:test],
                       data.num_classes, data.mean.flatten().tolist(), data.std.flatten().tolist(), data.name)


@pytest.fixture(scope="session")
def synthetic_data():
    args = make_args("--dataset", "synthetic", "--train-subset", 640)
    return common.load_data(args, torch.device("cpu"))


@pytest.fixture(scope="session")
def small_data(synthetic_data):
    """The 640 synthetic training images and the first 500 test images (one evaluation batch): the data of
    the short training runs and of the shared teacher."""
    return data_slice(synthetic_data, 640, 500)


# ------------------------------------------------------------------------------------------ teacher

# 60 steps of batch 32, lr 0.1 then 0.01 in the last epoch: 99.4 % test accuracy (chance 10 %) in ~5 s on a
# CPU. It replaces the teachers that test_sskd.py (6 epochs on 320 images) and test_lfcc.py (2 epochs, batch
# 64, lr 0.05: 26 % test accuracy) trained for themselves; measured with each, their students end as good or
# better with this one: SSKD's head 75.6 % (74.0 with its own), LFCC's Mixer / ViT 43.0 / 37.6 % (35.0 / 28.6).
TEACHER_RUN = ("--epochs", 3, "--batch-size", 32, "--lr", 0.1, "--milestones", 2, "--eval-every", 3)


@pytest.fixture(scope="session")
def trained_teacher(small_data, tmp_path_factory):
    """resnet8 (seed 0) trained briefly on `small_data`, frozen: real but small knowledge, trained once per
    session for every test that distils from it. Tests must leave it unchanged (the short runs check that
    they do); one that needs a trainable or train-mode teacher works on a copy.deepcopy of it."""
    args = make_args("--dataset", "synthetic", *TEACHER_RUN)
    teacher = tiny_model("resnet8", seed=0)
    summary = common.fit(teacher, small_data, tmp_path_factory.mktemp("teacher"), common.make_recipe(args, "cnn"),
                         **common.run_options(args))
    assert summary["last_acc"] > 90, summary["last_epoch"]
    return frozen(teacher)


# ---------------------------------------------------------------------------- the scripts end to end

@pytest.fixture(scope="session", autouse=True)
def synthetic_images_made_once():
    """make_synthetic draws the same images on every call (a fixed seed; about 1 s): draw them once per session
    and hand out copies, so that the many in-process script runs below cost their training only."""
    make_synthetic, made = common.make_synthetic, {}

    def made_once(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = make_synthetic(*args, **kwargs)
        splits, num_classes = made[key]
        return [t.clone() for t in splits], num_classes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "make_synthetic", made_once)
        yield


# 2 steps per epoch, 1 test batch
TINY = ["--dataset", "synthetic", "--train-subset", "100", "--batch-size", "50", "--test-subset", "100"]


def run(monkeypatch, main, *argv):
    """Run a script's main() as `python script.py argv...` would, through run_main (Ctrl-C and NaN lines)."""
    monkeypatch.setattr(sys, "argv", ["script.py", *map(str, argv)])
    common.run_main(main)


def refused(monkeypatch, capsys, main, *argv):
    """The one-line message of a refusal (SystemExit with a message, or an exit code and a logged line)."""
    with pytest.raises(SystemExit) as stop:
        run(monkeypatch, main, *argv)
    code = stop.value.code
    message = code if isinstance(code, str) else capsys.readouterr().out.strip().splitlines()[-1]
    assert message.startswith(("error:", "interrupted")) and "\n" not in message
    return message


def files_in(folder):
    """{relative path: bytes} of every file under `folder` but the (empty) lock files and the log, which a run
    only appends to (a refusal too, with its line): what a refusal must leave as it was."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name not in (".lock", runfolder.RUN_LOG)}


TEACHER_FILE = Path("checkpoints") / "synthetic-subset100" / "resnet8_1ep.pth"  # where --teacher-epochs 1 looks
METHOD_RUN = ["--teacher", "resnet8", "--teacher-epochs", 1, "--student", "resnet8", *TINY, "--epochs", 1]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A folder in which `python common.py --model resnet8 ... --epochs 1 --out-dir alone --save-as-teacher`
    ran once: its run in alone/, and the teacher the method scripts find there with --teacher-epochs 1."""
    root = tmp_path_factory.mktemp("scripts")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run(mp, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", "alone", "--save-as-teacher")
    return root


@pytest.fixture(scope="session")
def finished_runs(workdir):
    """One finished 1-epoch run of each method script in `workdir` (resnet8 -> resnet8, the teacher that
    common.py saved there; SSKD: 1 epoch per phase): {script: (its folder, its log, the paths it wrote through
    plumbing.files.write_atomic)}, and the teacher file's bytes before them. Tests read them, or work on copies."""

    runs = {"teacher file before": (workdir / TEACHER_FILE).read_bytes()}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        write_atomic, written = files.write_atomic, []
        replace_everywhere(mp, write_atomic, lambda path, content: written.append(Path(path)) or write_atomic(path, content))
        for module in (blockwise_kd, sskd, lfcc):
            name = module.__name__
            log, written[:] = io.StringIO(), []
            with contextlib.redirect_stdout(log):
                run(mp, module.main, *METHOD_RUN, "--out-dir", name)
            runs[name] = (workdir / name, log.getvalue(), [workdir / p for p in written])
    return runs


def read_summary(folder):
    return json.loads((Path(folder) / "summary.json").read_text())


def make_imagenet_folder(root, train_per_class, val_per_class, classes=("n01440764", "n01443537", "n01484850")):
    """root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG: 40-300 px a side, portrait, landscape and square,
    smooth colour fields, each class with its own saturated channel (learnable). Returns root."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(40, 300, 2))
                field = rng.integers(0, 256, (5, 5, 3)).astype(np.uint8)
                field[..., c % 3] = 255
                Image.fromarray(field).resize((w, h), Image.BICUBIC).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


# ------------------------------------------------------------------------ shared by several test files

IMAGENET_CLASSES = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture(scope="session")
def imagenet_folder(tmp_path_factory):
    """24 training and 9 validation JPEGs of 3 classes (conftest.make_imagenet_folder)."""
    return make_imagenet_folder(tmp_path_factory.mktemp("imagenet"), 8, 3, IMAGENET_CLASSES)


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a script gets as far as loading data, building a model or loading a teacher."""
    def reached(*args, **kwargs):
        pytest.fail("a bad input got past the command-line checks")
    for name in ("load_data", "build_model", "load_teacher"):
        monkeypatch.setattr(common, name, reached)


def common_run(monkeypatch, out, *extra):
    """`python common.py --model resnet8` on TINY for 1 epoch into `out`, in-process."""
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out, *extra)


def short_fit_args(tmp_path, *extra, model=None):
    """The flags of a 2-epoch run on 640 synthetic images into tmp_path, and a seeded resnet8 (or `model`)."""
    args = make_args("--dataset", "synthetic", "--train-subset", 640, "--epochs", 2, "--out-dir", tmp_path, *extra)
    torch.manual_seed(args.seed)
    model = model or create_model("resnet8", 10)
    return args, model


def written_run(out_dir, arch, method):
    """summary.json and model.pth of a finished run: a number for last_acc, the method named, and model.pth
    in the benchmark format, loading strictly into a fresh `arch` with the data's 10 classes, recording the
    fingerprint of the data it was trained on."""
    summary = json.loads((out_dir / "summary.json").read_text())
    assert isinstance(summary["last_acc"], float) and 0 <= summary["last_acc"] <= 100, summary["last_acc"]
    assert summary.get("method") == method
    model = common.build_model(arch, 10, torch.device("cpu"))
    checkpoint = common.load_weights(model, out_dir / "model.pth")  # SystemExit unless the architecture fits
    assert checkpoint["accuracy"] == summary["last_acc"] and checkpoint["epoch"] == summary["epochs"]
    assert checkpoint["data"] == summary["data"] and len(summary["data"]) == 16
    return summary, checkpoint["model"]


def method_run(finished_runs, workdir, script):
    """A finished run of a method script (conftest.finished_runs): its summary and student weights, after
    checking that it found the teacher common.py saved (not trained again), left it as it was, and recorded it."""
    out_dir, log, _ = finished_runs[script]
    assert "training it first" not in log and f"teacher resnet8 from {TEACHER_FILE}" in log
    assert (workdir / TEACHER_FILE).read_bytes() == finished_runs["teacher file before"]
    summary, weights = written_run(out_dir, "resnet8", script)
    teacher = torch.load(workdir / TEACHER_FILE, weights_only=True)
    assert summary["teacher"]["file"] == str(TEACHER_FILE) and summary["teacher"]["arch"] == "resnet8"
    assert (summary["teacher"]["epochs"], summary["teacher"]["accuracy"]) == (1, teacher["accuracy"])
    assert summary["teacher"]["data"] == summary["data"]  # the teacher used, and what it was trained on
    return summary, weights, teacher["model"]


# The scripts, by name: their module and the flags a run of each needs beyond the shared ones.
SCRIPTS = {"common": (common, ["--model", "resnet8"]), "blockwise_kd": (blockwise_kd, []), "sskd": (sskd, []),
           "lfcc": (lfcc, [])}


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

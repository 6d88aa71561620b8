"""Each script end to end, and runs never lose or mix results: run folders, resume, locks, teacher cache,
unreadable files (Ctrl-C and SIGTERM: test_faults.py).

Each test runs the scripts' own `main()` in-process on tiny synthetic data (1-2 epochs of 100 images), as a
user would from the command line, and checks what it wrote, or the one-line refusal and that nothing on disk
changed."""
import argparse
import fcntl
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import blockwise_kd as bkd
import common
from plumbing import files
from conftest import TEACHER_FILE, TINY, files_in, make_parser, refused, run


def train_once(monkeypatch, out, *extra):
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out, *extra)
    return files_in(out)


# ---------------------------------------------------------------------------- each script end to end

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


def test_common_script_writes_its_run_and_saves_the_model_as_teacher(workdir):
    summary, weights = written_run(workdir / "alone", "resnet8", None)
    assert summary["epochs"] == 1 and summary["evaluated_epochs"] == [1]
    assert summary["config"]["model"] == "resnet8" and summary["params"] == 78042
    teacher = torch.load(workdir / TEACHER_FILE, weights_only=True)["model"]
    assert teacher.keys() == weights.keys() and all(torch.equal(teacher[k], v) for k, v in weights.items())


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


def test_blockwise_kd_script(finished_runs, workdir):
    summary, weights, teacher = method_run(finished_runs, workdir, "blockwise_kd")
    assert summary["epochs"] == 1
    method = summary["blockwise_kd"]
    assert method["stones"] == [1, 2, 3] and method["teacher"] == "resnet8" and method["connector_params"] > 0
    assert method["connectors"] == {"1": "Connector", "2": "Connector", "3": "Connector"}
    assert {"task", "distill", "cross", "ramp", "stone1_acc", "stone2_acc", "stone3_acc"} <= set(summary["last_epoch"])
    assert not torch.equal(weights["conv1.weight"], teacher["conv1.weight"])  # the student, not the teacher


def test_sskd_script(finished_runs, workdir):
    summary, weights, teacher = method_run(finished_runs, workdir, "sskd")  # --epochs 1: 1 epoch per phase
    out_dir = finished_runs["sskd"][0]
    assert {name: phase["epochs"] for name, phase in summary["phases"].items()} == \
        {"stage1": 1, "stage2": 1, "stage3": 1, "head": 1}
    assert summary["epochs"] == 4 and (out_dir / "head" / "summary.json").exists()
    assert set(summary["stage_feat_mse"]) == {"stage1", "stage2", "stage3"}
    assert all(isinstance(v, float) and v >= 0 for v in summary["stage_feat_mse"].values())
    assert not torch.equal(weights["conv1.weight"], teacher["conv1.weight"])


def test_lfcc_script(finished_runs, workdir):
    summary, weights, teacher = method_run(finished_runs, workdir, "lfcc")
    assert summary["epochs"] == 1
    method = summary["lfcc"]
    assert (method["teacher"], method["student"], method["stages"]) == ("resnet8", "resnet8", [1, 2, 3])
    assert method["projector_params"] > 0
    assert {"ce", "kd", "lfcc", "test_rank_acc_s1", "test_rank_acc_s3"} <= set(summary["last_epoch"])
    assert not torch.equal(weights["conv1.weight"], teacher["conv1.weight"])


# -------------------------------------------------------------------------------------- run folders

def test_commands_that_train_differently_get_different_default_folders():
    parser = make_parser(bkd.add_args)
    data = argparse.Namespace(fingerprint="0123456789abcdef")

    def folder(*argv):
        return common.default_out_dir(parser.parse_args(list(map(str, argv))), parser, "blockwise_kd", data)

    blockkd = folder()
    kd_baseline = folder("--stones", "none", "--gamma", 0, "--alpha", 0.1, "--beta", 0.9)
    assert blockkd == "runs/blockwise_kd_cifar100_seed0"
    assert kd_baseline == "runs/blockwise_kd_cifar100_seed0_alpha0.1_beta0.9_gamma0.0_stones-none"
    assert folder("--epochs", 20) != blockkd and folder("--no-detach-ensemble") != blockkd
    # Flags that do not change what is learned do not change the folder.
    assert folder("--log-every", 5, "--data-dir", "elsewhere", "--eval-every", 2, "--amp", "bf16") == blockkd


def test_a_fresh_run_over_an_existing_one_is_refused_and_nothing_is_lost(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    before = train_once(monkeypatch, out)
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out)
    assert "already holds a run" in message and "--resume" in message
    assert files_in(out) == before
    train_once(monkeypatch, out, "--overwrite")  # an explicit --overwrite starts afresh


def test_resume_with_another_training_flag_is_refused_naming_each_flag(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    before = train_once(monkeypatch, out)
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet20", *TINY, "--epochs", 2, "--lr", 0.1,
                      "--out-dir", out, "--resume")
    assert "--epochs 2 (the run has 1)" in message and "--model resnet20 (the run has resnet8)" in message
    assert "--lr 0.1 (the run has None)" in message
    assert files_in(out) == before
    # Flags that do not change the result may differ.
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out, "--resume",
        "--log-every", 5, "--eval-every", 3)
    assert "resumed" in capsys.readouterr().out


def test_a_run_recorded_without_a_flag_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    """A run from before a flag existed is one whose flags differ: refused, with the flag named."""
    out = tmp_path / "run"
    before = train_once(monkeypatch, out)
    record = json.loads((out / "run.json").read_text())
    del record["config"]["label_smoothing"]  # as if --label-smoothing had been added after the run started
    (out / "run.json").write_text(json.dumps(record))
    before = files_in(out)
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 1,
                      "--out-dir", out, "--resume")
    assert message.endswith("with other training flags: --label-smoothing None (the run has no record of it); "
                            "nothing was changed. Resume with the run's flags, start afresh with --overwrite, or "
                            "choose another --out-dir")
    assert files_in(out) == before


def test_a_second_process_on_the_same_folder_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a") as other_process:  # a second open file description locks like another process
        fcntl.flock(other_process, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out)
    assert "another process is using --out-dir" in message
    assert not (out / "metrics.jsonl").exists()


def test_a_checkpoint_of_another_training_run_is_not_resumed(tmp_path):
    """The teacher case: a killed run of one length is not continued at another (fit checks the recipe)."""
    args = argparse.Namespace(seed=0, resume=True, log_every=30, eval_every=1, amp=None, channels_last=None,
                              compile=None)
    data = common.load_data(argparse.Namespace(dataset="synthetic", train_subset=100), torch.device("cpu"))
    model = common.build_model("resnet8", 10, torch.device("cpu"))
    recipe = common.make_recipe(args, "cnn", epochs=1, use_overrides=False)
    common.fit(model, data, tmp_path, recipe, seed=0, resume=True)
    before = files_in(tmp_path)
    with pytest.raises(SystemExit, match=r"from another training run \(the recipe's epochs 2 \(the checkpoint has 1\)"):
        common.fit(model, data, tmp_path, common.make_recipe(args, "cnn", epochs=2, use_overrides=False), seed=0,
                   resume=True)
    assert files_in(tmp_path) == before


# ------------------------------------------------------------------------------------------ teachers

def image_folder(root, seed):
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_teachers_of_folders_with_the_same_name_are_kept_apart(tmp_path, capsys):
    datasets = []
    for name, seed in (("a", 0), ("b", 1)):
        args = argparse.Namespace(dataset="folder", data_dir=str(image_folder(tmp_path / name / "images", seed)),
                                  train_subset=0, checkpoint_dir=str(tmp_path / "checkpoints"), teacher="resnet8",
                                  teacher_ckpt=None, teacher_epochs=240, amp=None, channels_last=None)
        datasets.append((args, common.load_data(args, torch.device("cpu"))))
    (args_a, data_a), (args_b, data_b) = datasets
    path_a, path_b = (common.teacher_path(a, d, "resnet8") for a, d in datasets)
    assert path_a != path_b and path_a.parent.name.startswith("folder-images-")
    # A cached teacher records its data; one found in the cache of other data is refused.
    model = common.build_model("resnet8", 2, torch.device("cpu"))
    path_b.parent.mkdir(parents=True)
    common.save_atomic(common.model_file(model, 1, 50.0, data_a), path_b)
    with pytest.raises(SystemExit, match="was trained on other data"):
        common.load_teacher(args_b, data_b)


# --------------------------------------------------------------------------- unreadable and unwritable

@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_unreadable_checkpoint_is_named_and_nothing_changes(tmp_path, monkeypatch, capsys, damage):
    out = tmp_path / "run"
    train_once(monkeypatch, out)
    checkpoint = out / "checkpoint.pt"
    checkpoint.write_bytes(b"not a checkpoint" if damage == "garbage" else checkpoint.read_bytes()[:5000])
    before = files_in(out)
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out,
                      "--resume")
    assert str(checkpoint) in message and "unreadable" in message and "nothing was changed" in message
    assert "weights_only" not in message
    assert files_in(out) == before


def test_unwritable_folders_are_found_before_anything_is_trained(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--out-dir", tmp_path / "a_file" / "run")
    assert message.startswith(f"error: cannot write to --out-dir {tmp_path / 'a_file' / 'run'}")

    def no_training(*args, **kwargs):
        raise AssertionError("a model was trained before the folders were checked")
    monkeypatch.setattr(common, "fit", no_training)
    message = refused(monkeypatch, capsys, bkd.main, "--teacher", "resnet8", "--student", "resnet8", *TINY,
                      "--out-dir", tmp_path / "run", "--checkpoint-dir", tmp_path / "a_file" / "checkpoints")
    assert message.startswith("error: cannot write to --checkpoint-dir")


# ------------------------------------------------------------------ the teacher cache, shared by runs

METHOD = ["--teacher", "resnet8", "--teacher-epochs", 1, "--student", "resnet8", *TINY, "--epochs", 1]


def test_a_teacher_being_made_by_another_process_is_waited_for_and_used(tmp_path, monkeypatch, capsys):
    """Two runs that need the same missing teacher: the one that claims it second waits, then uses the first's
    teacher instead of training its own over it (the other process stands in as a thread holding the claim)."""
    monkeypatch.chdir(tmp_path)
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", "made_elsewhere")
    target = tmp_path / TEACHER_FILE
    target.parent.mkdir(parents=True)
    other = files.FileLock(target.with_name(f".{target.name}.lock"))
    assert other.acquire()

    def the_other_run_finishes():
        target.write_bytes((tmp_path / "made_elsewhere" / "model.pth").read_bytes())
        other.release()
    threading.Timer(1.0, the_other_run_finishes).start()
    run(monkeypatch, bkd.main, *METHOD, "--out-dir", "waited")
    out = capsys.readouterr().out
    assert f"another process is making the teacher {TEACHER_FILE} (it holds " in out and "waiting for it" in out
    assert f"the teacher {TEACHER_FILE} was made by another process meanwhile: this run uses it" in out
    assert "training it first" not in out, out
    assert not list((tmp_path / "checkpoints" / "synthetic-subset100").glob("*_run_*"))
    assert target.read_bytes() == (tmp_path / "made_elsewhere" / "model.pth").read_bytes()  # not replaced


def test_save_as_teacher_is_refused_while_another_process_makes_that_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / TEACHER_FILE).parent.mkdir(parents=True)
    other = files.FileLock((tmp_path / TEACHER_FILE).with_name(".resnet8_1ep.pth.lock"))
    assert other.acquire()
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", "a",
                      "--save-as-teacher")
    assert message.startswith(f"error: another process is making the teacher {TEACHER_FILE} (it holds ")
    assert not (tmp_path / "a" / "checkpoint.pt").exists()  # refused before training
    other.release()


def test_a_run_resumes_with_its_own_teacher_whatever_the_cache_holds_later(tmp_path, monkeypatch, capsys):
    """The cache's teacher replaced after a run (another seed's, or --overwrite): the run keeps a copy (a hard
    link) of the teacher it was distilled from, and its --resume uses that copy; a fresh run uses the new one."""
    monkeypatch.chdir(tmp_path)
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--seed", 1, "--out-dir", "t1",
        "--save-as-teacher")
    run(monkeypatch, bkd.main, *METHOD, "--out-dir", "distilled")
    first = torch.load(tmp_path / "distilled" / "teacher.pth", weights_only=True)["model"]
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--seed", 2, "--out-dir", "t2",
        "--save-as-teacher", "--overwrite")
    assert f"replaced the earlier teacher {TEACHER_FILE}" in capsys.readouterr().out
    run(monkeypatch, bkd.main, *METHOD, "--out-dir", "distilled", "--resume")
    out = capsys.readouterr().out
    assert "teacher resnet8 from the run's own copy distilled/teacher.pth" in out and "(finished" in out
    saved = torch.load(tmp_path / "distilled" / "teacher.pth", weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in first.items())
    assert read_summary_teacher(tmp_path / "distilled") == common.fingerprint(*first.values())


def read_summary_teacher(folder):
    return json.loads((folder / "summary.json").read_text())["teacher"]["weights"]

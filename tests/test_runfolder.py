"""Run folders (plumbing/runfolder.py, identity.py, files.py): nothing adopted or lost, exact resumes, atomic writes."""
import argparse
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import blockwise_kd as bkd
import common
import sskd
from models import create_model
from plumbing import files, runfolder
from conftest import (METHOD_RUN, TEACHER_FILE, TINY, common_run, files_in, make_args, make_parser, read_summary,
                      refused, replace_everywhere, run, short_fit_args)


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the script handles it, so the run stops where it is."""


def killed_at_the_first_step(monkeypatch):
    def die(recipe, progress):
        raise Killed
    monkeypatch.setattr(common, "learning_rate", die)


def copy_of(finished_runs, script, tmp_path):
    destination = tmp_path / script
    shutil.copytree(finished_runs[script][0], destination, ignore=shutil.ignore_patterns(".lock"))
    return destination


def train_once(monkeypatch, out, *extra):
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out, *extra)
    return files_in(out)


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
    assert folder("--log-every", 5, "--data-dir", "elsewhere", "--eval-every", 2, "--amp", "bf16",
                  "--test-subset", 100) == blockkd


def test_a_run_resumes_with_another_test_subset(tmp_path, monkeypatch, capsys):
    """--test-subset changes what is measured, not what is learnt: not a training flag (run.json has no
    record of it), so a run started before the flag existed, or with another subset, resumes."""
    out = tmp_path / "run"
    tiny_without_test_subset = TINY[:TINY.index("--test-subset")]
    run(monkeypatch, common.main, "--model", "resnet8", *tiny_without_test_subset, "--epochs", 1, "--out-dir", out)
    assert "test_subset" not in json.loads((out / "run.json").read_text())["config"]
    capsys.readouterr()
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out, "--resume")
    out_lines = capsys.readouterr().out
    assert "100 test images" in out_lines and "resumed" in out_lines and "error" not in out_lines


def test_a_fresh_run_over_an_existing_one_is_refused_and_nothing_is_lost(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    before = train_once(monkeypatch, out)
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out)
    assert "already holds a run" in message and "--resume" in message
    assert files_in(out) == before
    train_once(monkeypatch, out, "--overwrite")  # an explicit --overwrite starts afresh


def test_overwrite_empties_the_folder_so_a_killed_overwrite_leaves_nothing_to_adopt(workdir, finished_runs, tmp_path,
                                                                                   monkeypatch, capsys):
    out = copy_of(finished_runs, "blockwise_kd", tmp_path)  # alpha 1, finished
    (out / "stage1").mkdir()
    (out / "stage1" / "summary.json").write_text("{}")  # what an SSKD run would have left
    monkeypatch.chdir(workdir)
    learning_rate = common.learning_rate
    killed_at_the_first_step(monkeypatch)
    with pytest.raises(Killed):
        run(monkeypatch, bkd.main, *METHOD_RUN, "--out-dir", out, "--overwrite", "--alpha", 0.5, "--gamma", 0)
    removed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--overwrite: removed")]
    assert len(removed) == 1 and f"from {out} (" in removed[0]
    assert all(name in removed[0] for name in ("checkpoint.pt", "model.pth", "summary.json", "stage1/"))
    assert set(files_in(out)) == {Path("run.json"), Path("teacher.pth")}  # the new run's, its log.txt, nothing else
    assert removed[0] in (out / "log.txt").read_text()
    monkeypatch.setattr(common, "learning_rate", learning_rate)
    run(monkeypatch, bkd.main, *METHOD_RUN, "--out-dir", out, "--resume", "--alpha", 0.5, "--gamma", 0)
    assert "resumed" not in capsys.readouterr().out  # no checkpoint to continue: trained afresh
    summary = read_summary(out)
    assert (summary["config"]["alpha"], summary["config"]["gamma"]) == (0.5, 0.0)
    flags = torch.load(out / "checkpoint.pt", weights_only=True)["identity"]["flags"]
    assert (flags["alpha"], flags["gamma"]) == (0.5, 0.0) and not (out / "stage1").exists()


def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--out-dir", tmp_path,
                      "--overwrite")
    assert "holds no run" in message and "notes.txt" in message and "nothing was removed" in message
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("script", ["common", "sskd"])
def test_a_run_that_failed_at_its_first_step_does_not_block_the_same_command(script, workdir, tmp_path, monkeypatch,
                                                                            capsys):
    """A crash before the first epoch ended (an out-of-memory error, a bad flag found late) leaves run.json, the
    log and, for SSKD, a phase folder: no result. The same command, as written, then runs."""
    monkeypatch.chdir(workdir)
    out = tmp_path / "run"
    main, argv = {"common": (common.main, ["--model", "resnet8", *TINY, "--epochs", 1]),
                  "sskd": (sskd.main, METHOD_RUN)}[script]
    learning_rate = common.learning_rate

    def out_of_memory(recipe, progress):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(common, "learning_rate", out_of_memory)
    with pytest.raises(RuntimeError):
        run(monkeypatch, main, *argv, "--out-dir", out)
    assert not list(runfolder.run_results(out))
    monkeypatch.setattr(common, "learning_rate", learning_rate)
    run(monkeypatch, main, *argv, "--out-dir", out)
    assert (out / "model.pth").exists() and "CUDA out of memory" not in (out / "log.txt").read_text()


def test_resume_equals_uninterrupted(tmp_path, small_data):
    args, model = short_fit_args(tmp_path / "full")
    common.fit(model, small_data, tmp_path / "full", common.make_recipe(args, "cnn"), **common.run_options(args))

    args, killed = short_fit_args(tmp_path / "killed")
    def dies_in_epoch_2(x, y, progress):
        if progress >= 1:
            raise KeyboardInterrupt
        return F.cross_entropy(killed(x), y), {}
    with pytest.raises(KeyboardInterrupt):
        common.fit(killed, small_data, tmp_path / "killed", common.make_recipe(args, "cnn"), loss_fn=dies_in_epoch_2,
                   **common.run_options(args))
    args, resumed = short_fit_args(tmp_path / "killed", "--resume")
    common.fit(resumed, small_data, tmp_path / "killed", common.make_recipe(args, "cnn"), **common.run_options(args))

    a = torch.load(tmp_path / "full" / "model.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "model.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_streamed_run_killed_mid_epoch_resumes_exactly(imagenet_folder, tmp_path):
    def setup(out, *extra):
        args = make_args("--dataset", "imagenet", "--data-dir", imagenet_folder, "--image-size", 64, "--epochs", 2,
                         "--batch-size", 8, "--out-dir", out, *extra)
        torch.manual_seed(0)
        return args, create_model("resnet8", 3), common.load_data(args, torch.device("cpu"))

    args, model, data = setup(tmp_path / "full", "--workers", 0)
    common.fit(model, data, tmp_path / "full", common.make_recipe(args, "cnn"), **common.run_options(args))
    args, killed, data = setup(tmp_path / "killed", "--workers", 2)

    def dies_in_epoch_2(x, y, progress):
        if progress >= 1.3:
            raise KeyboardInterrupt
        return F.cross_entropy(killed(x), y), {}
    with pytest.raises(KeyboardInterrupt):
        common.fit(killed, data, tmp_path / "killed", common.make_recipe(args, "cnn"), loss_fn=dies_in_epoch_2,
                   **common.run_options(args))
    args, resumed, data = setup(tmp_path / "killed", "--workers", 1, "--resume")
    common.fit(resumed, data, tmp_path / "killed", common.make_recipe(args, "cnn"), **common.run_options(args))
    a = torch.load(tmp_path / "full" / "model.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "model.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


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


@pytest.mark.parametrize("script, flag, value, saved", [("blockwise_kd", "--alpha", 0.5, "1.0"),
                                                      ("sskd", "--feat-weight", 1, "10.0")])
def test_without_run_json_the_checkpoints_still_refuse_another_run(script, flag, value, saved, workdir,
                                                                   finished_runs, tmp_path, monkeypatch, capsys):
    """Every checkpoint records the run's training flags (an SSKD phase's too): a resume is checked against
    them, whether or not run.json is there."""
    out = copy_of(finished_runs, script, tmp_path)
    (out / "run.json").unlink()
    before = files_in(out)
    monkeypatch.chdir(workdir)
    main = {"blockwise_kd": bkd.main, "sskd": sskd.main}[script]
    message = refused(monkeypatch, capsys, main, *METHOD_RUN, "--out-dir", out, "--resume", flag, value)
    assert "checkpoint.pt is from another training run" in message
    assert f"{flag} {float(value)} (the checkpoint has {saved})" in message
    assert files_in(out) == before  # run.json was not rewritten with the new flags
    run(monkeypatch, main, *METHOD_RUN, "--out-dir", out, "--resume")  # the run's own flags resume it
    assert "(finished: no epoch left to train)" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["script"] == script  # recorded again


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


def test_a_checkpoint_made_with_another_teacher_is_not_resumed(workdir, finished_runs, tmp_path, monkeypatch, capsys):
    out = copy_of(finished_runs, "blockwise_kd", tmp_path)
    data = common.load_data(make_args(*TINY), torch.device("cpu"))
    torch.manual_seed(5)
    other_teacher = tmp_path / "other_teacher.pth"
    common.save_atomic(common.model_file(common.build_model("resnet8", 10, torch.device("cpu")), 1, 10.0, data),
                       other_teacher)
    before = files_in(out)
    monkeypatch.chdir(workdir)
    message = refused(monkeypatch, capsys, bkd.main, *METHOD_RUN, "--out-dir", out, "--resume",
                      "--teacher-ckpt", other_teacher)  # a run-only flag: the early check lets it through
    assert "is from another training run (the teacher's weights " in message
    assert files_in(out) == before


def test_resuming_a_run_of_another_script_says_so(finished_runs, tmp_path, monkeypatch, capsys, workdir):
    out = tmp_path / "alone"
    shutil.copytree(workdir / "alone", out, ignore=shutil.ignore_patterns(".lock"))  # a common.py run
    before = files_in(out)
    message = refused(monkeypatch, capsys, bkd.main, *METHOD_RUN, "--out-dir", out, "--resume")
    assert message.startswith(f"error: cannot resume {out}: it holds a run of common.py, not of blockwise_kd.py")
    assert files_in(out) == before


def test_resume_in_a_folder_with_files_of_no_run_starts_the_run(tmp_path, monkeypatch, capsys):
    """The mini-benchmark writes its output.txt into a run folder before the run starts with --resume."""
    (tmp_path / "output.txt").write_text("")
    common_run(monkeypatch, tmp_path, "--resume")
    assert (tmp_path / "model.pth").exists() and (tmp_path / "output.txt").exists()


@pytest.mark.parametrize("script", ["common", "sskd"])
def test_resume_never_trains_again_a_finished_run_whose_checkpoint_was_deleted(script, workdir, finished_runs,
                                                                               tmp_path, monkeypatch, capsys):
    if script == "common":
        out = tmp_path / "alone"
        shutil.copytree(workdir / "alone", out, ignore=shutil.ignore_patterns(".lock"))
        main, argv = common.main, ["--model", "resnet8", *TINY, "--epochs", 1]
    else:
        out, main, argv = copy_of(finished_runs, "sskd", tmp_path), sskd.main, METHOD_RUN
    for checkpoint in out.rglob("checkpoint.pt"):
        checkpoint.unlink()
    before = files_in(out)
    monkeypatch.chdir(workdir)
    message = refused(monkeypatch, capsys, main, *argv, "--out-dir", out, "--resume")
    assert message.startswith(f"error: cannot resume {out}: it holds results (") and "no checkpoint.pt" in message
    assert files_in(out) == before


@pytest.mark.parametrize("damage", ["empty", "truncated", "no config", "a list", "a directory"])
def test_a_damaged_run_json_is_one_line_and_overwrite_still_works(damage, workdir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(workdir / "alone", out, ignore=shutil.ignore_patterns(".lock"))
    run_file = out / "run.json"
    text = {"empty": "", "truncated": run_file.read_text()[:40], "no config": "{}", "a list": "[1, 2]"}.get(damage)
    if text is None:
        run_file.unlink()
        run_file.mkdir()
    else:
        run_file.write_text(text)
    before = files_in(out)
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out,
                      "--resume")
    assert message.startswith(f"error: {run_file} is damaged") and "--overwrite" in message
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out)
    assert "already holds a run" in message
    assert files_in(out) == before and run_file.exists()
    common_run(monkeypatch, out, "--overwrite")
    assert json.loads(run_file.read_text())["script"] == "common" and read_summary(out)["epochs"] == 1


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


def test_a_second_process_on_the_same_folder_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a") as other_process:  # a second open file description locks like another process
        fcntl.flock(other_process, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out)
    assert "another process is using --out-dir" in message
    assert not (out / "metrics.jsonl").exists()


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


def failing_write(monkeypatch, name, error, after_bytes=100, times=1):
    """Make the next `times` writes of files called `name` fail with OSError `error` after `after_bytes` bytes, as a
    full disk does: the partial temporary file is on disk when the error comes."""
    real_open, left = open, [times]

    class FailingFile:
        def __init__(self, path):
            self.file = real_open(path, "wb")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, content):
            self.file.write(bytes(content[:after_bytes]))
            self.file.flush()
            raise OSError(error, os.strerror(error))

    def fake_open(path, mode="r", *args, **kwargs):
        if os.path.basename(path) == name + ".tmp" and left[0] > 0:
            left[0] -= 1
            return FailingFile(path)
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(files, "open", fake_open, raising=False)


@pytest.mark.parametrize("name", ["run.json", "metrics.jsonl", "model.pth", "summary.json"])
def test_a_full_disk_is_one_line_and_leaves_no_file_half_written(name, tmp_path, monkeypatch, capsys):
    """A finished run, resumed, rewrites metrics.jsonl, summary.json and model.pth (checkpoint.pt: the next test);
    --overwrite writes run.json anew."""
    out = tmp_path / "run"
    common_run(monkeypatch, out)  # every file exists once, complete
    before = files_in(out)
    failing_write(monkeypatch, name, errno.ENOSPC)
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out,
                      "--overwrite" if name == "run.json" else "--resume")
    assert message.startswith(f"error: cannot write {out / name} (No space left on device); ")
    assert not list(out.rglob("*.tmp"))  # the partial temporary file is gone
    if name == "run.json":  # written after --overwrite emptied the folder, as asked
        assert files_in(out) == {}
    else:  # every file is its previous, complete version
        assert files_in(out) == before


def test_a_full_disk_at_the_second_checkpoint_keeps_the_first_and_says_how_to_resume(tmp_path, monkeypatch,
                                                                                    capsys):
    out = tmp_path / "run"
    saves = []
    save_atomic = common.save_atomic

    def second_checkpoint_fails(obj, path):
        if path.name == "checkpoint.pt":
            saves.append(path)
            if len(saves) == 2:
                failing_write(monkeypatch, "checkpoint.pt", errno.ENOSPC)
        save_atomic(obj, path)
    replace_everywhere(monkeypatch, save_atomic, second_checkpoint_fails)
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 2, "--out-dir", out)
    resume = f"python script.py --model resnet8 {' '.join(TINY)} --epochs 2 --out-dir {out} --resume"
    assert message == (f"error: cannot write {out / 'checkpoint.pt'} (No space left on device); the last complete "
                       f"checkpoint is {out / 'checkpoint.pt'} (epoch 1/2); to resume: {resume}")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1 and not list(out.glob("*.tmp"))
    replace_everywhere(monkeypatch, second_checkpoint_fails, save_atomic)
    monkeypatch.setattr(files, "open", open, raising=False)
    run(monkeypatch, common.main, *resume.split()[2:])  # the advice, as written
    assert "resumed" in capsys.readouterr().out and read_summary(out)["epochs"] == 2


def test_a_file_that_cannot_be_replaced_is_one_line_and_stays_as_it_was(tmp_path, monkeypatch):
    """An immutable (chattr +i) or otherwise protected checkpoint.pt: the rename onto it fails."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the last complete checkpoint")

    def replace(source, destination):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit) as stop:
        common.save_atomic({"epoch": 2}, path)
    assert stop.value.code.startswith(f"error: cannot write {path} (Operation not permitted); ")
    assert path.read_bytes() == b"the last complete checkpoint" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_every_file_a_run_writes_is_written_atomically(finished_runs, workdir):
    """The class of half-written files: each file in a finished run folder (an SSKD run's phases included)
    was last written through plumbing.files.write_atomic, so none can be left half-written; log.txt apart, which is
    appended line by line (its last line at worst is cut)."""
    for script in ("blockwise_kd", "sskd", "lfcc"):
        out, _, written = finished_runs[script]
        files = {p.resolve() for p in out.rglob("*") if p.is_file() and p.name not in (".lock", runfolder.RUN_LOG)}
        assert (out / runfolder.RUN_TEACHER).samefile(workdir / TEACHER_FILE)  # a hard link, a rename atomically
        files.remove((out / runfolder.RUN_TEACHER).resolve())
        assert len(files) >= 5 and files <= {p.resolve() for p in written}, script

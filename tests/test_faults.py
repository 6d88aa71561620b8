"""Faults a new user meets, each of which once went wrong: a run never adopts another run's files (after an
--overwrite, without run.json, from another script or teacher), and damaged run folders, full disks,
read-only files, SIGTERM and NaN end in one line with nothing lost. (Image folders: test_data.py.)

The scripts run in-process as from the command line (conftest.run), on tiny synthetic data, or on copies of
the finished runs of conftest.finished_runs."""
import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import blockwise_kd as bkd
import common
import sskd
from plumbing import files, progress, runfolder
from conftest import METHOD_RUN, TEACHER_FILE, TINY, files_in, make_args, read_summary, refused, replace_everywhere, run


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


def common_run(monkeypatch, out, *extra):
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", out, *extra)


# ---------------------------------------------------------------- a run adopts another run's files

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


def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--out-dir", tmp_path,
                      "--overwrite")
    assert "holds no run" in message and "notes.txt" in message and "nothing was removed" in message
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_in_a_folder_with_files_of_no_run_starts_the_run(tmp_path, monkeypatch, capsys):
    """The mini-benchmark writes its output.txt into a run folder before the run starts with --resume."""
    (tmp_path / "output.txt").write_text("")
    common_run(monkeypatch, tmp_path, "--resume")
    assert (tmp_path / "model.pth").exists() and (tmp_path / "output.txt").exists()


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


# ------------------------------------------------------------------------------ damaged run folders

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


# ------------------------------------------------------------------------- full disks, read-only files

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


# ------------------------------------------------------------------------------------ signals, NaN

def ctrl_c():
    raise KeyboardInterrupt


def sigterm():  # what a cluster scheduler sends before it pre-empts the job
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("stop_run, code, prefix", [(ctrl_c, 130, "interrupted"),
                                                    (sigterm, 143, "interrupted (SIGTERM)")])
def test_ctrl_c_and_sigterm_say_where_the_last_checkpoint_is_and_how_to_resume(stop_run, code, prefix, tmp_path,
                                                                               monkeypatch, capsys):
    out = tmp_path / "run"
    learning_rate = common.learning_rate

    def stop_in_epoch_2(recipe, progress):  # at the first step of the second epoch
        if progress >= 1:
            stop_run()
        return learning_rate(recipe, progress)
    monkeypatch.setattr(common, "learning_rate", stop_in_epoch_2)
    with pytest.raises(SystemExit) as stop:
        run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 2, "--out-dir", out)
    assert stop.value.code == code
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == (f"{prefix}: the last complete checkpoint is {out / 'checkpoint.pt'} (epoch 1/2); to resume: "
                         f"python script.py --model resnet8 {' '.join(TINY)} --epochs 2 --out-dir {out} --resume")
    assert signal.getsignal(signal.SIGTERM) is not progress.raise_terminated  # the handler lives only in run_main
    monkeypatch.setattr(common, "learning_rate", learning_rate)
    run(monkeypatch, common.main, *last_line.split("to resume: python script.py ")[1].split())  # as written
    assert "resumed" in capsys.readouterr().out and read_summary(out)["epochs"] == 2


def test_the_nan_advice_works_as_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        common_run(monkeypatch, out, "--lr", 1e30)
    assert stop.value.code == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("error: the training loss became NaN/inf in epoch 1")
    assert "lower --lr (this run's is 1e+30)" in line and "adding --overwrite" in line
    common_run(monkeypatch, out, "--lr", 0.05, "--overwrite")  # the advice, followed
    assert read_summary(out)["recipe"]["lr"] == 0.05

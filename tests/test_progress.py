"""Progress and stop lines (plumbing/progress.py, session.py): speed and ETA, log.txt, one line for every stop."""
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import common
from plumbing import progress
from conftest import TINY, common_run, read_summary, run, short_fit_args


def test_the_progress_line_counts_the_images_of_every_rank(monkeypatch, capsys):
    """Under torchrun a rank sees its part of each global batch; speed and ETA are the run's: 2 ranks that each
    did 2 steps of 32 images of global batches of 64 in 2 s train at 64 images/s, with 8 steps an epoch."""
    clock = iter([100.0, 102.0, 102.0])
    monkeypatch.setattr(common.time, "time", lambda: next(clock))
    recipe = {"batch_size": 64, "epochs": 1}
    line = common.ProgressLine(0, recipe, 8, 1.0, None)
    line.maybe_log(1, torch.tensor(64.0), 64 // 2, images_done=2 * 64)
    assert capsys.readouterr().out.strip() == "epoch 1 step 2/8 loss 2.0000 64 img/s ETA 0m06s (training only)"


def ctrl_c():
    raise KeyboardInterrupt


def sigterm():  # what a cluster scheduler sends before it pre-empts the job
    os.kill(os.getpid(), signal.SIGTERM)


def worker_killed():  # what DataLoader raises when the out-of-memory killer ends a decoding worker
    raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")


@pytest.mark.parametrize("stop_run, code, prefix", [
    (ctrl_c, 130, "interrupted:"), (sigterm, 143, "interrupted (SIGTERM):"),
    (worker_killed, 1, "error: a decoding worker process stopped (DataLoader worker (pid(s) 4242) exited "
                       "unexpectedly; the out-of-memory killer, or a signal);")])
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
    assert last_line == (f"{prefix} the last complete checkpoint is {out / 'checkpoint.pt'} (epoch 1/2); to resume: "
                         f"python script.py --model resnet8 {' '.join(TINY)} --epochs 2 --out-dir {out} --resume")
    assert signal.getsignal(signal.SIGTERM) is not progress.raise_terminated  # the handler lives only in run_main
    monkeypatch.setattr(common, "learning_rate", learning_rate)
    run(monkeypatch, common.main, *last_line.split("to resume: python script.py ")[1].split())  # as written
    assert "resumed" in capsys.readouterr().out and read_summary(out)["epochs"] == 2


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, small_data):
    args, model = short_fit_args(tmp_path)
    def nan_in_epoch_2(x, y, progress):
        loss = F.cross_entropy(model(x), y)
        return (loss * float("nan") if progress >= 1.5 else loss), {}
    with pytest.raises(FloatingPointError, match="NaN") as error:
        common.fit(model, small_data, tmp_path, common.make_recipe(args, "cnn"), loss_fn=nan_in_epoch_2,
                   **common.run_options(args))
    assert "intact" in str(error.value)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v.float()).all() for v in checkpoint["model"].values())


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

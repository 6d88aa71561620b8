"""The training core (common.fit, main): a short run learns and writes its outputs, top-5, --evaluate."""
import json
import re

import pytest
import torch
from PIL import Image

import common
from models import create_model
from plumbing import session
from conftest import TEACHER_FILE, make_args, short_fit_args, written_run


def test_short_run_learns_and_writes_outputs(tmp_path, small_data):
    args, model = short_fit_args(tmp_path, "--epochs", 5)
    summary = common.fit(model, small_data, tmp_path, common.make_recipe(args, "cnn"), **common.run_options(args))
    assert summary["last_acc"] > 50  # chance is 10 %
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert {"epoch", "train_loss", "test_acc", "lr", "images_per_sec", "seconds"} <= set(rows[0])
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert {"last_acc", "best_acc", "best_epoch", "epochs", "params", "seconds", "config"} <= set(saved)
    assert saved["params"] == 78042 and saved["config"]["dataset"] == "synthetic"
    benchmark_format = torch.load(tmp_path / "model.pth", weights_only=True)
    assert benchmark_format["epoch"] == 5 and benchmark_format["accuracy"] == summary["last_acc"]
    fresh = create_model("resnet8", 10)
    common.load_weights(fresh, tmp_path / "model.pth")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_unknown_model_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        make_args("--teacher", "resnet9000")
    assert "resnet9000" in capsys.readouterr().err


def test_the_run_folder_keeps_the_log_with_times_and_evaluate_prints_top_5(tmp_path, monkeypatch, capsys):
    """log.txt holds what the terminal showed, each line after its date and time, the command first; with more
    than 10 classes top-5 is measured beside top-1; `common.py --evaluate FILE` measures a saved model."""
    monkeypatch.chdir(tmp_path)
    big = tmp_path / "big"
    for split in ("train", "test"):
        for c in range(12):
            (big / split / f"class{c}").mkdir(parents=True)
            pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(c))
            Image.fromarray(pixels.numpy()).save(big / split / f"class{c}" / "0.png")
    flags = ["--dataset", "folder", "--data-dir", big, "--epochs", 1, "--batch-size", 12]
    common.run_main(lambda: common.main([str(a) for a in ["--model", "resnet8", *flags, "--out-dir", "run"]]))
    shown = capsys.readouterr().out.splitlines()
    logged = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert logged[0].endswith(" $ " + session.command_line()) and len(logged) == len(shown) + 1
    for line, printed in zip(logged[1:], shown):
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d " + re.escape(printed), line)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["last_top5"] >= summary["last_acc"] and "test_top5" in summary["last_epoch"]
    metrics = common.main([str(a) for a in ["--evaluate", "run/model.pth", *flags]])  # --model from the file
    assert metrics == {k: summary["last_epoch"][k] for k in ("test_acc", "test_top5")}
    assert capsys.readouterr().out.strip().startswith(f"run/model.pth: resnet8, top-1 {metrics['test_acc']:.2f} %, "
                                                      f"top-5 {metrics['test_top5']:.2f} % on the 12 test images of")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        [".lock", "checkpoint.pt", "log.txt", "metrics.jsonl", "model.pth", "run.json", "summary.json"])


def test_common_script_writes_its_run_and_saves_the_model_as_teacher(workdir):
    summary, weights = written_run(workdir / "alone", "resnet8", None)
    assert summary["epochs"] == 1 and summary["evaluated_epochs"] == [1]
    assert summary["config"]["model"] == "resnet8" and summary["params"] == 78042
    teacher = torch.load(workdir / TEACHER_FILE, weights_only=True)["model"]
    assert teacher.keys() == weights.keys() and all(torch.equal(teacher[k], v) for k, v in weights.items())

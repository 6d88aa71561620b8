import argparse
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
from plumbing import session
from conftest import make_args
from models import create_model


def train(tmp_path, *extra, model=None):
    args = make_args("--dataset", "synthetic", "--train-subset", 640, "--epochs", 2, "--out-dir", tmp_path, *extra)
    torch.manual_seed(args.seed)
    model = model or create_model("resnet8", 10)
    return args, model


def test_short_run_learns_and_writes_outputs(tmp_path, synthetic_data):
    args, model = train(tmp_path, "--epochs", 5)
    summary = common.fit(model, synthetic_data, tmp_path, common.make_recipe(args, "cnn"), **common.run_options(args))
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


def test_resume_equals_uninterrupted(tmp_path, synthetic_data):
    args, model = train(tmp_path / "full")
    common.fit(model, synthetic_data, tmp_path / "full", common.make_recipe(args, "cnn"), **common.run_options(args))

    args, killed = train(tmp_path / "killed")
    def dies_in_epoch_2(x, y, progress):
        if progress >= 1:
            raise KeyboardInterrupt
        return F.cross_entropy(killed(x), y), {}
    with pytest.raises(KeyboardInterrupt):
        common.fit(killed, synthetic_data, tmp_path / "killed", common.make_recipe(args, "cnn"), loss_fn=dies_in_epoch_2,
                   **common.run_options(args))
    args, resumed = train(tmp_path / "killed", "--resume")
    common.fit(resumed, synthetic_data, tmp_path / "killed", common.make_recipe(args, "cnn"), **common.run_options(args))

    a = torch.load(tmp_path / "full" / "model.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "model.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) == 2


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, synthetic_data):
    args, model = train(tmp_path)
    def nan_in_epoch_2(x, y, progress):
        loss = F.cross_entropy(model(x), y)
        return (loss * float("nan") if progress >= 1.5 else loss), {}
    with pytest.raises(FloatingPointError, match="NaN") as error:
        common.fit(model, synthetic_data, tmp_path, common.make_recipe(args, "cnn"), loss_fn=nan_in_epoch_2,
                   **common.run_options(args))
    assert "intact" in str(error.value)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v.float()).all() for v in checkpoint["model"].values())


def test_wrong_checkpoint_names_both(tmp_path):
    data = argparse.Namespace(fingerprint="0123456789abcdef")
    common.save_atomic(common.model_file(create_model("resnet8", 10), 1, 0.0, data), tmp_path / "r8.pth")
    with pytest.raises(SystemExit, match="resnet8 with 10 classes.*resnet20 with 10 classes"):
        common.load_weights(create_model("resnet20", 10), tmp_path / "r8.pth")
    with pytest.raises(SystemExit, match="resnet8 with 10 classes.*resnet8 with 100 classes"):
        common.load_weights(create_model("resnet8", 100), tmp_path / "r8.pth")
    # A bare benchmark-style file (no 'arch' entry) is identified by its keys and shapes.
    torch.save({"model": create_model("wrn_16_2", 100).state_dict(), "epoch": 240}, tmp_path / "public.pth")
    with pytest.raises(SystemExit, match="wrn_16_2 with 100 classes.*resnet8x4"):
        common.load_weights(create_model("resnet8x4", 100), tmp_path / "public.pth")
    with pytest.raises(SystemExit, match=f"checkpoint {tmp_path} is a directory, not a checkpoint file"):
        common.load_weights(create_model("resnet8", 10), tmp_path)  # it said "does not exist"
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable"):
        common.load_weights(create_model("resnet8", 10), tmp_path / "junk.pth")


def test_unknown_model_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        make_args("--teacher", "resnet9000")
    assert "resnet9000" in capsys.readouterr().err


def test_schedules():
    args = make_args()
    cnn = common.make_recipe(args, "cnn")
    assert cnn["milestones"] == [150, 180, 210] and cnn["batch_size"] == 64
    assert [common.learning_rate(cnn, e) for e in (0, 149.9, 150, 180, 210)] == pytest.approx([0.05, 0.05, 5e-3, 5e-4, 5e-5])
    token = common.make_recipe(make_args("--epochs", 20), "token")
    assert token["optimizer"] == "adamw" and token["warmup_epochs"] == 2
    assert common.learning_rate(token, 1) == pytest.approx(0.5e-3, rel=1e-2)
    assert common.learning_rate(token, 2) == pytest.approx(1e-3) and common.learning_rate(token, 20) == pytest.approx(0)
    assert common.make_recipe(make_args("--lr", 0.1, "--milestones", 5, 7), "cnn")["milestones"] == [5, 7]


def test_short_run_milestones_are_distinct_so_no_epoch_decays_twice():
    assert common.make_recipe(make_args(), "cnn", epochs=20)["milestones"] == [12, 15, 18]
    five = common.make_recipe(make_args(), "cnn", epochs=5)
    assert five["milestones"] == [3, 4]  # 3.125, 3.75, 4.375 round to 3, 4, 4
    assert [common.learning_rate(five, e + 0.5) for e in range(5)] == pytest.approx([0.05, 0.05, 0.05, 5e-3, 5e-4])


def test_no_milestone_at_epoch_0_so_a_short_run_uses_its_peak_lr():
    one = common.make_recipe(make_args("--dataset", "imagenet"), "cnn", epochs=1)  # 0.3, 0.6, 0.9 round to 0, 1, 1
    assert one["milestones"] == [1] and common.learning_rate(one, 0.5) == 0.2


def test_the_progress_line_counts_the_images_of_every_rank(monkeypatch, capsys):
    """Under torchrun a rank sees its part of each global batch; speed and ETA are the run's: 2 ranks that each
    did 2 steps of 32 images of global batches of 64 in 2 s train at 64 images/s, with 8 steps an epoch."""
    clock = iter([100.0, 102.0, 102.0])
    monkeypatch.setattr(common.time, "time", lambda: next(clock))
    recipe = {"batch_size": 64, "epochs": 1}
    line = common.ProgressLine(0, recipe, 8, 1.0, None)
    line.maybe_log(1, torch.tensor(64.0), 64 // 2, images_done=2 * 64)
    assert capsys.readouterr().out.strip() == "epoch 1 step 2/8 loss 2.0000 64 img/s ETA 0m06s (training only)"


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


def test_benchmark_lr_for_mobilenet_and_shufflenets_and_the_flag_overrides_it():
    for name in ("MobileNetV2", "ShuffleV1", "ShuffleV2"):
        assert common.make_recipe(make_args(), "cnn", model_name=name)["lr"] == 0.01
        assert common.make_recipe(make_args("--lr", 0.05), "cnn", model_name=name)["lr"] == 0.05
    assert common.make_recipe(make_args(), "cnn", model_name="vgg8")["lr"] == 0.05


def test_missing_teacher_is_trained_then_found_and_only_for_its_epochs(tmp_path, synthetic_data, capsys,
                                                                      monkeypatch):
    args = make_args("--dataset", "synthetic", "--train-subset", 640, "--teacher", "resnet8",
                     "--teacher-epochs", 1, "--checkpoint-dir", tmp_path)
    teacher = common.load_teacher(args, synthetic_data)
    assert "training it first" in capsys.readouterr().out
    short = tmp_path / "synthetic-subset640" / "resnet8_1ep.pth"  # not resnet8.pth, the 240-epoch teacher's place
    assert short.exists()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    again = common.load_teacher(args, synthetic_data)
    assert "training it first" not in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), again.state_dict().values()))
    record = common.teacher_record(again)  # what summary.json records of the teacher used
    assert record["file"] == str(short) and record["epochs"] == 1 and record["data"] == synthetic_data.fingerprint
    assert record["arch"] == "resnet8" and record["accuracy"] == torch.load(short, weights_only=True)["accuracy"]

    # A run of the standard 240 epochs does not take the 1-epoch teacher: it trains its own beside it ...
    def train_teacher(args, data, teacher, target):
        raise RuntimeError(f"would train {args.teacher_epochs} epochs into {target}")
    monkeypatch.setattr(common, "train_teacher", train_teacher)
    standard_argv = ["--dataset", "synthetic", "--train-subset", 640, "--teacher", "resnet8", "--checkpoint-dir", tmp_path]
    standard = make_args(*standard_argv)
    with pytest.raises(RuntimeError, match="would train 240 epochs into .*synthetic-subset640/resnet8.pth$"):
        common.load_teacher(standard, synthetic_data)
    # ... and a short teacher put in its place is refused, not used.
    shutil.copy(short, short.with_name("resnet8.pth"))
    with pytest.raises(SystemExit, match=r"resnet8.pth holds a 1-epoch teacher, not the 240-epoch one this run asks"):
        common.load_teacher(standard, synthetic_data)
    # Given by name it is taken as it is, and recorded as what it is.
    explicit = make_args(*standard_argv, "--teacher-ckpt", short)
    assert common.teacher_record(common.load_teacher(explicit, synthetic_data))["epochs"] == 1

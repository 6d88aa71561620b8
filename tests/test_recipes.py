"""The recipes (common.RECIPES, make_recipe, learning_rate): rows by the data, schedules, milestones, warm-up.

The recipe table's rows (--recipe): chosen by the data, each entry a flag, the epochs resolved and recorded so
that a resume compares them."""
import json

import pytest

import common
from conftest import TINY, make_args, run


@pytest.mark.parametrize("flags, setting", [
    ((), "cifar"), (("--dataset", "cifar10", "--image-size", 224), "ofa"), (("--dataset", "imagenet"), "imagenet"),
    (("--dataset", "synthetic", "--image-size", 224), "cifar"), (("--dataset", "imagenet", "--recipe", "cifar"), "cifar")])
def test_the_recipe_follows_the_data_unless_given(flags, setting):
    assert common.recipe_setting(make_args(*flags)) == setting


def test_the_imagenet_and_ofa_rows_are_the_sources():
    cnn = common.make_recipe(make_args("--dataset", "imagenet"), "cnn", model_name="tv_resnet18")
    assert (cnn["optimizer"], cnn["lr"], cnn["momentum"], cnn["weight_decay"], cnn["batch_size"]) == \
        ("sgd", 0.2, 0.9, 1e-4, 512)
    assert (cnn["epochs"], cnn["schedule"], cnn["milestones"], cnn["lr_decay"]) == (100, "step", [30, 60, 90], 0.1)
    ofa = make_args("--dataset", "cifar100", "--image-size", 224)
    vit = common.make_recipe(ofa, "token")
    assert (vit["optimizer"], vit["lr"], vit["weight_decay"], vit["batch_size"], vit["epochs"], vit["schedule"],
            vit["warmup_epochs"]) == ("adamw", 5e-4, 0.05, 128, 300, "cosine", 20)
    cnn = common.make_recipe(ofa, "cnn", model_name="MobileNetV2")  # the CIFAR zoo's lr is the cifar row's
    assert (cnn["optimizer"], cnn["lr"], cnn["weight_decay"], cnn["epochs"], cnn["schedule"]) == \
        ("sgd", 0.05, 2e-3, 300, "cosine")
    # Every entry is a flag; --epochs shortens the schedule in proportion.
    short = common.make_recipe(make_args("--dataset", "imagenet", "--epochs", 10, "--lr", 0.1), "cnn")
    assert (short["epochs"], short["milestones"], short["lr"]) == (10, [3, 6, 9], 0.1)
    assert common.learning_rate(cnn, 150) == pytest.approx(0.025)  # cosine, halfway


def test_the_cifar_row_is_unchanged():
    cnn = common.make_recipe(make_args(), "cnn", model_name="resnet8")
    assert (cnn["lr"], cnn["weight_decay"], cnn["batch_size"], cnn["epochs"], cnn["milestones"]) == \
        (0.05, 5e-4, 64, 240, [150, 180, 210])
    token = common.make_recipe(make_args(), "token")
    assert (token["lr"], token["warmup_epochs"], token["label_smoothing"]) == (1e-3, 5, 0.1)


def test_run_json_records_the_resolved_recipe_and_epochs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1)
    [folder] = (tmp_path / "runs").iterdir()
    assert folder.name == "resnet8_synthetic-subset100_seed0_batch-size50_epochs1"
    config = json.loads((folder / "run.json").read_text())["config"]
    assert (config["recipe"], config["epochs"]) == ("cifar", 1)


def test_a_rows_warm_up_scales_with_the_epochs():
    ofa = ["--dataset", "cifar100", "--image-size", 224]
    assert common.make_recipe(make_args(*ofa), "token")["warmup_epochs"] == 20
    assert common.make_recipe(make_args(*ofa, "--epochs", 30), "token")["warmup_epochs"] == pytest.approx(2)
    assert common.make_recipe(make_args(*ofa), "token", epochs=15)["warmup_epochs"] == pytest.approx(1)  # a teacher
    assert common.make_recipe(make_args(*ofa, "--epochs", 30, "--warmup-epochs", 5), "token")["warmup_epochs"] == 5


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


def test_benchmark_lr_for_mobilenet_and_shufflenets_and_the_flag_overrides_it():
    for name in ("MobileNetV2", "ShuffleV1", "ShuffleV2"):
        assert common.make_recipe(make_args(), "cnn", model_name=name)["lr"] == 0.01
        assert common.make_recipe(make_args("--lr", 0.05), "cnn", model_name=name)["lr"] == 0.05
    assert common.make_recipe(make_args(), "cnn", model_name="vgg8")["lr"] == 0.05

"""The recipe table's rows (--recipe): chosen by the data, each entry a flag, the epochs resolved and
recorded so that a resume compares them."""
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

"""Any input size and any number of stages: data, methods and pairs at the run's size and stage count.

Any input size and any number of stages: the data is made and augmented at --image-size, every method probes
its shapes at the run's size, and every method takes the stage count from the models (a 4-stage stand-in pair
here), with a pair of different counts refused."""
import argparse

import pytest
import torch
import torch.nn as nn

import blockwise_kd as bkd
import common
import lfcc
import models
import sskd
from models.resnet import BasicBlock
from plumbing import datasets
from conftest import frozen, make_args, tiny_model


class FourStageNet(nn.Module):
    """A 4-stage CNN stand-in (the ImageNet models have four): a stem, then four BasicBlock stages halving
    the grid from the second on, global pooling and a linear head."""
    feature_kind, stage_output_activation = "map", "relu"

    def __init__(self, widths=(8, 8, 16, 16, 32), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        self.blocks = nn.ModuleList(BasicBlock(widths[i], widths[i + 1], 1 if i == 0 else 2) for i in range(4))
        self.fc = nn.Linear(widths[-1], num_classes)

    def stages(self):
        return [nn.Sequential(self.stem, self.blocks[0]), *self.blocks[1:]]

    def head(self):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), self.fc)

    def forward(self, x):
        for stage in self.stages():
            x = stage(x)
        return self.head()(x)


def four_stage(seed, widths=(8, 8, 16, 16, 32)):
    torch.manual_seed(seed)
    model = FourStageNet(widths)
    model.arch = "resnet8"  # the cnn recipe
    return model


# ------------------------------------------------------------------------------------------ image size

def test_synthetic_images_at_another_size_and_the_32_pixel_ones_unchanged():
    (train_x, train_y, test_x, _), classes = common.make_synthetic(train_size=40, test_size=20, image_size=64)
    assert train_x.shape == (40, 3, 64, 64) and test_x.shape == (20, 3, 64, 64) and train_x.dtype == torch.uint8
    (small_x, small_y, *_), _ = common.make_synthetic(train_size=40, test_size=20)
    assert torch.equal(train_y, small_y) and small_x.shape == (40, 3, 32, 32)
    # The 64-pixel images are the 32-pixel ones, resized: same content, twice the side.
    assert (datasets.resize_uint8(small_x, 64).int() - train_x.int()).abs().max() == 0


def test_batches_are_cropped_at_the_data_size(synthetic_data):
    big = datasets.resize_uint8(synthetic_data.train_x[:64], 48)
    data = common.Data(big, synthetic_data.train_y[:64], big, synthetic_data.train_y[:64], 10, (0.5,) * 3,
                       (0.25,) * 3, "synthetic")
    x, y = next(data.train_batches(16, seed=0, epoch=0))
    assert data.image_size == 48 and x.shape == (16, 3, 48, 48)


def test_every_method_probes_its_shapes_at_the_runs_size():
    teacher, student = frozen(tiny_model("resnet8", seed=0)), tiny_model("narrow_resnet8", seed=1)
    stones = bkd.SteppingStones(teacher, student, [1, 2, 3], image_size=64)
    features, _ = models.stage_features(student, torch.zeros(2, 3, 64, 64))
    assert [tuple(stones(i, f).shape) for i, f in zip((1, 2, 3), features)] == [(2, 10)] * 3
    assert stones.connectors["1"].side == 64  # the teacher's stage-1 grid at 64 pixels
    low_pass = lfcc.make_filter(make_args(method_args=lfcc.add_args))
    space = lfcc.make_compact_space(student, teacher, [1, 2, 3], low_pass, 16, image_size=64)
    assert [p.in_features for p in space.teacher] == [16 * 21, 32 * 21, 64 * 21]  # pooled: size-free
    assert models.feature_shapes(teacher, 64) == [(16, 64, 64), (32, 32, 32), (64, 16, 16)]


def test_a_model_of_one_size_refuses_another_and_pairs_of_two_sizes_need_the_flag():
    with pytest.raises(SystemExit, match="vit takes 32x32 inputs only, not --image-size 64"):
        common.image_size_of(make_args("--student", "vit", "--image-size", 64))
    assert common.image_size_of(make_args("--teacher", "resnet8", "--student", "resnet8")) == 32
    assert common.image_size_of(make_args("--image-size", 64, "--teacher", "resnet8", "--student", "vgg8")) == 64
    data = argparse.Namespace(fingerprint="0" * 16, image_size=64)
    assert common.dataset_tag(make_args("--dataset", "synthetic"), data) == "synthetic-64px"  # its own teachers


def test_cifar_is_kept_at_32():
    with pytest.raises(SystemExit, match="--dataset cifar100 is kept at its own 32x32 .* drop --store-size 64"):
        common.load_data(make_args("--image-size", 64, "--store-size", 64), torch.device("cpu"))


# -------------------------------------------------------------------------------------- stage counts

def test_block_kd_takes_every_stage_of_a_four_stage_pair():
    teacher, student = frozen(four_stage(0, (8, 16, 16, 32, 32))), four_stage(1)
    stones = bkd.SteppingStones(teacher, student, bkd.parse_stones("all", 4))
    assert stones.stones == [1, 2, 3, 4] and stones.num_stages == 4
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss, terms = bkd.make_loss_fn(student, teacher, stones, make_args(method_args=bkd.add_args), 0.0, 0.0)(x, y, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and all(c.project[0].weight.grad is not None for c in stones.connectors.values())
    assert bkd.stone_weight(1, 4) == 0.125
    with pytest.raises(ValueError, match="stages 1..3, not '4'"):
        bkd.parse_stones("4", 3)


def test_lfcc_aligns_every_stage_of_a_four_stage_pair():
    teacher, student = frozen(four_stage(0)), four_stage(1)
    args = make_args("--stages", 1, 2, 3, 4, method_args=lfcc.add_args)
    low_pass = lfcc.make_filter(args)
    space = lfcc.make_compact_space(student, teacher, args.stages, low_pass, 16)
    _, _, per_stage = lfcc.stage_alignment(torch.randn(6, 3, 32, 32), student, teacher, space, low_pass,
                                           stages=args.stages)
    assert len(per_stage) == len(space.student) == 4 and all(torch.isfinite(loss) for loss, _ in per_stage)


def test_sskd_has_a_phase_per_stage_of_a_four_stage_pair(synthetic_data, tmp_path):
    from conftest import data_slice

    data = data_slice(synthetic_data, 64, 50)
    teacher, student = frozen(four_stage(0)), four_stage(1)
    args = make_args("--dataset", "synthetic", "--epochs", 5, "--batch-size", 32, "--out-dir", tmp_path,
                     method_args=sskd.add_args)
    backbone, head_epochs = sskd.phase_plan(args, 4)
    assert [name for name, _, _ in backbone] == ["stage1", "stage2", "stage3", "stage4"] and head_epochs == 1
    summary = sskd.distill(args, data, teacher, student)
    assert set(summary["stage_feat_mse"]) == {"stage1", "stage2", "stage3", "stage4"}
    assert set(summary["phases"]) == {"stage1", "stage2", "stage3", "stage4", "head"}


def test_a_pair_with_different_stage_counts_is_one_line(synthetic_data, tmp_path):
    teacher, student = frozen(four_stage(0)), tiny_model("resnet8", seed=1)
    for module in (bkd, sskd):
        args = make_args("--dataset", "synthetic", "--out-dir", tmp_path, method_args=module.add_args)
        with pytest.raises(SystemExit, match=r"has 3 stages and \w+ 4: .* need the same number"):
            module.distill(args, synthetic_data, teacher, student)


@pytest.mark.parametrize("script, pair, wanted", [
    ("sskd", ["--teacher", "tv_resnet18", "--student", "resnet8"], "resnet8 has 3 stages and tv_resnet18 4"),
    ("blockwise_kd", ["--teacher", "resnet8", "--student", "tv_resnet18"], "tv_resnet18 has 4 stages and resnet8 3"),
    ("sskd", ["--teacher", "resnet8", "--student", "resnet14", "--teacher-input"], None)])
def test_what_the_names_and_shapes_rule_out_stops_before_a_teacher_is_trained(script, pair, wanted, tmp_path,
                                                                             monkeypatch, capsys):
    """The method's modules are built once on the meta device before the data is read and a missing teacher
    trained (it was refused only after 240 teacher epochs)."""
    import importlib

    module = importlib.import_module(script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common, "load_data", lambda *a: pytest.fail("read the data"))
    argv = [*pair, "--dataset", "synthetic", "--image-size", 32]
    if wanted is None:  # resnet14's stages match resnet8's: the pair passes and the run starts
        with pytest.raises(pytest.fail.Exception, match="read the data"):
            module.main([str(a) for a in argv])
        return
    with pytest.raises((SystemExit, RuntimeError, ValueError)) as stop:
        module.main([str(a) for a in argv])
    assert wanted in str(stop.value)

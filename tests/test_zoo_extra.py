"""The benchmark zoo's VGGs, MobileNetV2, ShuffleV1/V2 and ResNet50, and one-step smoke tests of the three
methods on heterogeneous pairs built from them (full-size models, batch 2, 10 classes)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import blockwise_kd as bkd
import lfcc
import sskd
from conftest import changed_keys, frozen, make_args, snapshot
from models import (DEFAULT_LR, MODEL_NAMES, OTHER_CNNS, VGGS, classifier, create_model, feature_shapes,
                    model_family, stage_features, state_dict_classes)

NEW = list(VGGS) + list(OTHER_CNNS)

# The stage outputs at 32x32 as models/__init__.py documents them.
STAGE_SHAPES = {
    **{name: [(128, 16, 16), (256, 8, 8), (512, 4, 4)] for name in VGGS},
    "MobileNetV2": [(12, 16, 16), (16, 8, 8), (48, 4, 4)],
    "ShuffleV1": [(240, 16, 16), (480, 8, 8), (960, 4, 4)],
    "ShuffleV2": [(116, 16, 16), (232, 8, 8), (464, 4, 4)],
    "ResNet50": [(512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
}


# ------------------------------------------------------------------------------------------- the models

def test_registered_as_cnns_with_the_benchmark_lr():
    assert all(name in MODEL_NAMES and model_family(name) == "cnn" for name in NEW)
    assert DEFAULT_LR == {"MobileNetV2": 0.01, "ShuffleV1": 0.01, "ShuffleV2": 0.01}


@pytest.mark.parametrize("name", NEW)
def test_stage_shapes_are_the_documented_ones(name):
    # Keys, shapes, parameter counts and the zoo's feature points: tests/test_models.py, for every zoo model.
    assert feature_shapes(create_model(name, num_classes=100)) == STAGE_SHAPES[name]


@pytest.mark.parametrize("name", NEW)
def test_stages_then_head_equal_forward_in_train_and_eval_mode(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            features, logits = stage_features(model, x)
            assert torch.equal(logits, model(x)), training
        assert [tuple(f.shape[1:]) for f in features] == STAGE_SHAPES[name]


@pytest.mark.parametrize("name", NEW)
def test_stage_output_activation_is_true(name):
    """'relu' models give non-negative stage outputs; the others (MobileNetV2) some negative values."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).train()
    with torch.no_grad():
        features, _ = stage_features(model, torch.randn(2, 3, 32, 32))
    if model.stage_output_activation == "relu":
        assert all((f >= 0).all() for f in features)
    else:
        assert all((f < 0).any() for f in features)
    assert model.feature_kind == "map"


def test_classifier_and_class_count_of_every_model():
    for name in MODEL_NAMES:
        with torch.device("meta"):
            model = create_model(name, num_classes=7)
        assert isinstance(classifier(model), nn.Linear) and classifier(model).out_features == 7, name
        assert state_dict_classes(model.state_dict()) == 7, name


# ------------------------------------------------------------------- the methods on heterogeneous pairs

PAIRS = [("vgg13", "MobileNetV2"), ("resnet32x4", "ShuffleV2"), ("ResNet50", "vgg8"), ("wrn_40_2", "ShuffleV1"),
         ("ShuffleV1", "mlp_mixer"), ("vgg13", "vit")]


def pair(teacher_name, student_name):
    torch.manual_seed(0)
    teacher, student = frozen(create_model(teacher_name, 10)), create_model(student_name, 10).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    return teacher, student, x, y


def first_stage_gradient(student):
    return sum(p.grad.abs().sum() for p in student.stages()[0].parameters() if p.grad is not None)


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_blockwise_kd_step(teacher_name, student_name):
    teacher, student, x, y = pair(teacher_name, student_name)
    teacher_before = snapshot(teacher)
    stones = bkd.SteppingStones(teacher, student, [1, 2, 3]).train()  # as fit trains it
    features, logits = stage_features(student, x)
    stone_logits = stones.all_logits(features)
    loss = F.cross_entropy(logits, y) + sum(F.cross_entropy(z, y) for z in stone_logits.values())
    loss.backward()
    assert torch.isfinite(loss) and first_stage_gradient(student) > 0
    assert all(p.grad is not None for p in stones.parameters())
    # Gradients went through the teacher's stages, which stayed in eval mode: BatchNorm buffers unchanged.
    assert not any(m.training for m in teacher.modules())
    assert changed_keys(teacher, teacher_before) == set()


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_sskd_step(teacher_name, student_name):
    teacher, student, x, _ = pair(teacher_name, student_name)
    adapters = {k: sskd.make_adapter(s, t) for k, (s, t) in enumerate(zip(feature_shapes(student), feature_shapes(teacher)))}
    distances = sskd.feature_distances(student, teacher, adapters, x, [0, 1, 2])  # all stages, as --joint does
    loss = sum(distances)
    loss.backward()
    assert len(distances) == 3 and torch.isfinite(loss) and first_stage_gradient(student) > 0
    assert all(p.grad is not None for a in adapters.values() for p in a.parameters())


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_lfcc_step(teacher_name, student_name):
    teacher, student, x, _ = pair(teacher_name, student_name)
    args = make_args("--dataset", "synthetic", method_args=lfcc.add_args)
    low_pass = lfcc.make_filter(args)
    space = lfcc.make_compact_space(student, teacher, args.stages, low_pass, args.proj_dim, args.reduce_channels)
    _, _, per_stage = lfcc.stage_alignment(x, student, teacher, space, low_pass, stages=args.stages, tau=args.tau)
    loss = torch.stack([stage_loss for stage_loss, _ in per_stage]).mean()
    loss.backward()
    assert torch.isfinite(loss) and first_stage_gradient(student) > 0
    assert all(p.grad is not None for p in space.parameters())  # projectors and channel reductions
    # Wide stage outputs are reduced to 256 channels: no projector takes more than 21 * 256 inputs.
    assert max(m.in_features for m in [*space.student, *space.teacher]) <= 21 * 256

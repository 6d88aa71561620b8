"""The CIFAR zoo and token models (models/): the benchmark's keys, stages then head = forward, each method on them."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import blockwise_kd as bkd
import lfcc
import sskd
from models import (CIFAR_MODELS, DEFAULT_LR, FEATURE_POINTS, MODEL_NAMES, OTHER_CNNS, VGGS, classifier, create_model,
                    feature_shapes, model_family, resize_map, stage_features, state_dict_classes, to_map, to_tokens)
from conftest import SHARED, changed_keys, frozen, make_args, snapshot

NEW = list(VGGS) + list(OTHER_CNNS)

# The stage outputs at 32x32 as models/__init__.py documents them.
STAGE_SHAPES = {
    **{name: [(128, 16, 16), (256, 8, 8), (512, 4, 4)] for name in VGGS},
    "MobileNetV2": [(12, 16, 16), (16, 8, 8), (48, 4, 4)],
    "ShuffleV1": [(240, 16, 16), (480, 8, 8), (960, 4, 4)],
    "ShuffleV2": [(116, 16, 16), (232, 8, 8), (464, 4, 4)],
    "ResNet50": [(512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
}

PAIRS = [("vgg13", "MobileNetV2"), ("resnet32x4", "ShuffleV2"), ("ResNet50", "vgg8"), ("wrn_40_2", "ShuffleV1"),
         ("ShuffleV1", "mlp_mixer"), ("vgg13", "vit")]

ZOO = SHARED / "reference" / "cifar_model_zoo.json"
ZOO_NAMES = [n for n in CIFAR_MODELS if n not in ("vit", "mlp_mixer")]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as error:
        create_model("resnet9000")
    assert "resnet9000" in str(error.value) and "resnet32x4" in str(error.value) and "mlp_mixer" in str(error.value)


@pytest.mark.skipif(not ZOO.exists(), reason="../shared/reference not beside the checkout")
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_state_dict_matches_zoo_and_loads_strictly(name):
    zoo = json.loads(ZOO.read_text())["models"][name]
    model = create_model(name, num_classes=100)
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(k, s) for k, s in zoo["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == zoo["params"]
    # A state_dict built from the JSON alone (as a public checkpoint would be) loads with strict=True.
    fake = {k: torch.randn(s) if s else torch.tensor(7) for k, s in zoo["state_dict"]}
    model.load_state_dict(fake, strict=True)
    assert torch.equal(classifier(model).weight, fake[zoo["state_dict"][-2][0]])
    assert state_dict_classes(fake) == 100
    assert feature_shapes(model) == [tuple(zoo["is_feat_shapes"][i]) for i in FEATURE_POINTS.get(name, (1, 2, 3))]


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_stages_then_head_equal_forward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    keys = list(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features, logits = stage_features(model, x)
        assert torch.equal(logits, model(x))
    assert len(features) == 3
    assert list(model.state_dict()) == keys  # views add no state_dict names
    model_params = {id(p) for p in model.parameters()}
    stage_params = [{id(p) for p in s.parameters()} for s in model.stages() + [model.head()]]
    assert set().union(*stage_params) == model_params  # stages and head cover the model...
    assert sum(len(s) for s in stage_params) == len(model_params)  # ...and do not overlap


def test_stage_view_mode_and_gradients_reach_the_model():
    model = create_model("resnet8", 10)
    model.eval()
    stage2 = model.stages()[1]
    stage2.train()
    assert model.layer2.training and not model.layer1.training and not model.layer3.training
    stage2(torch.randn(2, 16, 32, 32)).sum().backward()
    assert model.layer2[0].conv1.weight.grad is not None and model.layer1[0].conv1.weight.grad is None


def test_feature_shapes_leave_batchnorm_untouched():
    model = create_model("resnet8", 10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert feature_shapes(model) == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_token_models_shapes():
    for name, dim in (("vit", 192), ("mlp_mixer", 128)):
        assert feature_shapes(create_model(name, 10)) == [(64, dim)] * 3


def test_tokens_and_maps_round_trip_in_patch_order():
    x = torch.randn(2, 5, 8, 8)
    assert torch.equal(to_map(to_tokens(x)), x)
    tokens = torch.randn(2, 64, 7)
    assert torch.equal(to_tokens(to_map(tokens)), tokens)
    mixer = create_model("mlp_mixer", 10)  # no position embedding: patch tokens are the conv map, row-major
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(to_map(mixer.patch_embed(image)), mixer.patch_embed.proj(image))


def test_resize_map():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(resize_map(x, 4), x)
    assert resize_map(x, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # 2x2 averages
    assert resize_map(x, 8).shape == (1, 1, 8, 8)


@pytest.mark.skipif(not (SHARED / "data" / "resnet56_cifar100_public.pth").exists(), reason="no ../shared/data")
def test_public_resnet56_scores_616_of_916():
    import numpy as np

    import common

    model = create_model("resnet56", 100)
    common.load_weights(model, SHARED / "data" / "resnet56_cifar100_public.pth")
    images = np.load(SHARED / "data" / "cifar100_test_first916.npz")
    x = torch.from_numpy(images["x"]).permute(0, 3, 1, 2)
    mean, std = common.NORMALIZATION["cifar100"]
    data = common.Data(x, torch.from_numpy(images["y"]), x, torch.from_numpy(images["y"]), 100, mean, std, "c100")
    with torch.no_grad():
        correct = (model.eval()(data.normalize(x)).argmax(1) == data.test_y).sum().item()
    assert correct == 616


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

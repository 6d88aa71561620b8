"""The ImageNet architectures (models/imagenet.py): four stages, keys and outputs of their references.

The ImageNet architectures (models/imagenet.py): torchvision's own models split into four stages with their
keys unchanged; DeiT-Tiny/Small, MLP-Mixer B/16 and the KD benchmarks' MobileNetV1 equal to their reference
implementations (keys, shapes, outputs in float64, from ../shared/reference/imagenet_oracle.json); the methods
reading class-token teachers."""
import json
import math

import pytest
import torch

import blockwise_kd as bkd
import lfcc
import models
import sskd
from models.imagenet import REFERENCE_MODELS, TORCHVISION_MODELS, torchvision_classes
from conftest import SHARED, frozen, make_args

ORACLE = SHARED / "reference" / "imagenet_oracle.json"
REFERENCE_KEYS = {"timm_deit_tiny_patch16_224": "deit_tiny_patch16_224",
                  "timm_deit_small_patch16_224": "deit_small_patch16_224", "timm_mixer_b16_224": "mixer_b16_224",
                  "mdistiller_mobilenetv1": "mdistiller_mobilenetv1"}


def fill(model):
    """The oracle's deterministic weights (imagenet_models.md), keyed by the sorted key names."""
    state = model.state_dict()
    for i, key in enumerate(sorted(state)):
        t = state[key]
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        if key.endswith("running_var"):
            v = 1 + 0.1 * r.abs()
        elif t.dim() == 1 and key.endswith("weight"):
            v = 1 + 0.1 * r
        elif t.dim() <= 1:
            v = 0.1 * r
        else:
            v = r / math.sqrt(t[0].numel())
        t.copy_(v.to(t.dtype))
    return model


@pytest.mark.skipif(not ORACLE.exists(), reason="../shared/reference not beside the checkout")
@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_a_reference_model_equals_its_reference_in_keys_shapes_and_outputs(name):
    reference = json.loads(ORACLE.read_text())["models"][REFERENCE_KEYS[name]]
    model = models.create_model(name, 1000).double().eval()
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(reference["state_dict"].items())
    assert sum(p.numel() for p in model.parameters()) == reference["params"]
    fill(model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        features, logits = models.stage_features(model, x)
    torch.testing.assert_close(logits, torch.tensor(reference["logits"], dtype=torch.float64), atol=1e-9, rtol=0)
    # The stage outputs are the reference's block outputs 3, 6, 9, 12 (timm) or its four features (mdistiller).
    blocks = reference["block_outputs"]
    points = [blocks[i] for i in (2, 5, 8, 11)] if len(blocks) == 12 else blocks
    for feature, point in zip(features, points):
        assert list(feature.shape) == point["shape"]
        torch.testing.assert_close(feature.flatten()[:8], torch.tensor(point["first"], dtype=torch.float64),
                                   atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_a_torchvision_model_keeps_its_keys_and_is_its_stages_then_head(name):
    import torchvision

    source, _ = torchvision_classes()[name]
    with torch.device("meta"):
        ours, theirs = models.create_model(name, 10), torchvision.models.get_model(source, num_classes=10)
        shapes = models.feature_shapes(ours, 224)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]
    sides = [models.grid_shape(shape)[1] for shape in shapes]
    assert sides == [56, 28, 14, 7] or name == "tv_vit_b_16" and sides == [14] * 4
    torch.manual_seed(0)
    model = models.create_model(name, 10).eval()
    size = models.fixed_image_size(name) or 64
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        features, logits = models.stage_features(model, x)
        assert torch.equal(logits, model(x)) and len(features) == 4


def test_every_imagenet_model_has_four_stages_and_its_classifier_found():
    for name in models.IMAGENET_MODELS:
        with torch.device("meta"):
            model = models.create_model(name, 7)
        assert len(model.stages()) == 4 and models.classifier(model).out_features == 7, name
        assert models.state_dict_classes(model.state_dict()) == 7, name
        assert models.default_image_size(name) == 224


@pytest.mark.parametrize("name", models.IMAGENET_MODELS)
def test_a_new_head_replaces_the_classifier_and_nothing_else(name):
    """The fine-tuning start (start_from_weights): only the head()'s last Linear changes, and the model runs
    with the new class count. The last Linear in module order is an MLP layer of the last block in Swin, the
    DeiTs and the Mixer, whose head is registered first."""
    from models.imagenet import replace_classifier

    with torch.device("meta"):
        model = models.create_model(name, 1000)
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    old_head = models.classifier(model)
    replace_classifier(model, 7)
    after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    changed = {k for k in before if before[k] != after[k]}
    assert after.keys() == before.keys() and len(changed) == 2 and all(k.endswith(("weight", "bias")) for k in changed)
    assert models.classifier(model) is not old_head and models.classifier(model).out_features == 7
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 7)


def test_class_tokens_are_read_off_the_grid():
    tokens = torch.randn(2, 197, 8)
    assert models.has_class_token((197, 8)) and not models.has_class_token((196, 8))
    assert models.grid_shape((197, 8)) == (8, 14)
    assert torch.equal(models.to_map(tokens), tokens[:, 1:].transpose(1, 2).reshape(2, 8, 14, 14))


@pytest.fixture(scope="module")
def deit_teacher_and_cnn_student():
    torch.manual_seed(0)
    teacher = frozen(models.create_model("timm_deit_tiny_patch16_224", 10))
    student = models.create_model("mdistiller_mobilenetv1", 10)
    return teacher, student, torch.randn(4, 3, 224, 224), torch.randint(0, 10, (4,))


def test_block_kd_feeds_a_class_token_teacher_with_a_learned_class_token(deit_teacher_and_cnn_student):
    teacher, student, x, y = deit_teacher_and_cnn_student
    stones = bkd.SteppingStones(teacher, student, [1, 2, 3, 4], image_size=224)
    assert all(c.class_token is not None for c in stones.connectors.values())
    features, _ = models.stage_features(student, x)
    assert stones.connectors["2"](features[1]).shape == (4, 197, 192)
    loss, _ = bkd.make_loss_fn(student, teacher, stones, make_args(method_args=bkd.add_args), 0.0, 0.0)(x, y, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and stones.connectors["1"].class_token.grad is not None


def test_sskd_compares_a_class_token_teacher_on_its_patch_tokens(deit_teacher_and_cnn_student):
    teacher, student, x, _ = deit_teacher_and_cnn_student
    shapes = list(zip(models.feature_shapes(student, 224), models.feature_shapes(teacher, 224)))
    adapter = sskd.make_adapter(*shapes[1])
    distance = sskd.feature_distances(student, teacher, {1: adapter}, x, [1])[0]
    with torch.no_grad():
        z, t = x, x
        for stage in student.stages()[:2]:
            z = stage(z)
        for stage in teacher.stages()[:2]:
            t = stage(t)
        expected = torch.nn.functional.mse_loss(adapter(z), t[:, 1:])
    torch.testing.assert_close(distance.detach(), expected)


def test_lfcc_aligns_a_class_token_teacher_on_its_grid(deit_teacher_and_cnn_student):
    teacher, student, x, _ = deit_teacher_and_cnn_student
    args = make_args("--stages", 1, 2, 3, 4, method_args=lfcc.add_args)
    low_pass = lfcc.make_filter(args)
    space = lfcc.make_compact_space(student, teacher, args.stages, low_pass, 16, image_size=224)
    assert [p.in_features for p in space.teacher] == [192 * 21] * 4
    _, _, per_stage = lfcc.stage_alignment(x, student, teacher, space, low_pass, stages=args.stages)
    assert len(per_stage) == 4 and all(torch.isfinite(loss) for loss, _ in per_stage)


# ---------------------------------------------------------------------------- torchvision's weights



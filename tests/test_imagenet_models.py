"""The ImageNet architectures (models/imagenet.py): torchvision's own models split into four stages with
their keys unchanged; DeiT-Tiny/Small, MLP-Mixer B/16 and the KD benchmarks' MobileNetV1 equal to their
reference implementations (keys, shapes, outputs in float64, from ../shared/reference/imagenet_oracle.json);
the methods reading class-token teachers."""
import json
import math
from pathlib import Path

import pytest
import torch

import blockwise_kd as bkd
import common
import lfcc
import models
import sskd
from conftest import SHARED, frozen, make_args, refused, run
from models.imagenet import REFERENCE_MODELS, TORCHVISION_MODELS, torchvision_classes

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

@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A TORCH_HOME of the test's own, with no network: a download raises URLError at once."""
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_missing_weights_without_a_network_are_one_line_naming_the_file_and_where(torch_home):
    with pytest.raises(SystemExit) as stop:
        common.torchvision_weights("tv_resnet18", "IMAGENET1K_V1")
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert stop.value.code == (f"error: cannot load torchvision's resnet18 IMAGENET1K_V1 weights (URLError); "
                               f"without a network, download {url} elsewhere and put it at "
                               f"{torch_home / 'resnet18-f37072fd.pth'}")
    with pytest.raises(SystemExit, match="torchvision has no IMAGENET9K weights for resnet18; it has"):
        common.torchvision_weights("tv_resnet18", "IMAGENET9K")
    with pytest.raises(SystemExit, match="timm_deit_tiny_patch16_224 has no torchvision weights"):
        common.torchvision_weights("timm_deit_tiny_patch16_224", "IMAGENET1K_V1")


def test_weights_in_torch_home_load_strictly_and_get_a_new_head(torch_home, synthetic_data):
    torch.manual_seed(3)
    imagenet = models.create_model("tv_resnet18", 1000).state_dict()
    torch_home.mkdir(parents=True)
    torch.save(imagenet, torch_home / "resnet18-f37072fd.pth")  # as torchvision's download would have left it
    state, record = common.torchvision_weights("tv_resnet18", "IMAGENET1K_V1")
    assert record["accuracy"] == 69.758 and record["file"] == str(torch_home / "resnet18-f37072fd.pth")
    model = common.start_from_weights("tv_resnet18", state, 10, torch.device("cpu"))
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in imagenet.items() if not k.startswith("fc."))
    assert ours["fc.weight"].shape == (10, 512)  # a new head for the data's classes


def test_torchvision_weights_teach_1000_wnid_classes_as_they_are_and_are_measured_first(torch_home, tmp_path, capsys):
    """As the teacher of ImageNet's 1000 classes the weights are used as they are, frozen; they are measured on
    the run's validation split first (recorded beside the published number, with a warning near chance), the
    class folders must be wnids (the weights' outputs are their sorted order), and --teacher-epochs, which has
    nothing to train, is said to be unused."""
    from PIL import Image

    for split in ("train", "val"):
        for c in range(1000):
            (tmp_path / "imagenet" / split / f"n{c:08d}").mkdir(parents=True)
            Image.new("RGB", (8, 8), (c % 256, c // 256, 0)).save(tmp_path / "imagenet" / split / f"n{c:08d}" / "0.JPEG")
    torch.manual_seed(3)
    imagenet = models.create_model("tv_resnet18", 1000).state_dict()
    torch_home.mkdir(parents=True)
    torch.save(imagenet, torch_home / "resnet18-f37072fd.pth")
    args = make_args("--teacher", "tv_resnet18", "--teacher-weights", "IMAGENET1K_V1", "--dataset", "imagenet",
                     "--data-dir", tmp_path / "imagenet", "--image-size", 32, "--workers", 0, "--teacher-epochs", 30,
                     method_args=bkd.add_args)
    data = common.load_data(args, torch.device("cpu"))
    assert data.num_classes == 1000 and data.classes[:2] == ["n00000000", "n00000001"]
    teacher = common.load_teacher(args, data)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in imagenet.items())
    record = common.teacher_record(teacher)
    assert record["published_accuracy"] == 69.758 and record["accuracy"] is None
    assert 0 <= record["test_acc"] <= record["test_top5"] <= 100
    out = capsys.readouterr().out
    assert "--teacher-epochs 30 is not used: there is nothing to fine-tune" in out
    assert f"teacher tv_resnet18 measured on this run's test split (1000 images): top-1 {record['test_acc']:.2f} %" in out
    assert "warning: the teacher's top-1 accuracy" in out and "near chance (0.1 %)" in out  # random weights
    data.classes = [f"class{c}" for c in range(1000)]
    with pytest.raises(SystemExit, match=r"but this data's 1000 classes are class0, class1, class2, \.\.\.: name the "
                                         "class folders by their wnids"):
        common.load_teacher(args, data)


def test_a_teacher_fine_tuned_from_torchvision_weights_is_that_of_common_py_and_cached_under_their_name(
        torch_home, tmp_path, monkeypatch):
    """--teacher-weights on data of other classes fine-tunes them (new head) for --teacher-epochs, exactly as
    `common.py --pretrained --save-as-teacher` does, and caches the result as <teacher>-<WEIGHTS>_<E>ep.pth,
    never taken for the teacher trained from scratch."""
    torch_home.mkdir(parents=True)
    torch.save(models.create_model("tv_resnet18", 1000).state_dict(), torch_home / "resnet18-f37072fd.pth")
    monkeypatch.chdir(tmp_path)
    data_flags = ["--dataset", "synthetic", "--train-subset", 100, "--image-size", 32]  # the teacher's batch
    run(monkeypatch, common.main, "--model", "tv_resnet18", "--pretrained", *data_flags, "--epochs", 1,
        "--out-dir", "alone", "--save-as-teacher")
    [saved] = Path("checkpoints").glob("*/tv_resnet18-IMAGENET1K_V1_1ep.pth")
    args = make_args("--teacher", "tv_resnet18", "--teacher-weights", "IMAGENET1K_V1", "--teacher-epochs", 1,
                     *data_flags, "--checkpoint-dir", "own", method_args=bkd.add_args)
    data = common.load_data(args, torch.device("cpu"))
    teacher = common.load_teacher(args, data)  # none in own/: fine-tuned first
    assert teacher.source["file"] == str(Path("own") / saved.parent.name / saved.name)
    expected = torch.load(saved, weights_only=True)["model"]
    assert all(torch.equal(v, expected[k]) for k, v in teacher.state_dict().items())
    from_scratch = make_args("--teacher", "tv_resnet18", "--teacher-epochs", 1, *data_flags,
                             method_args=bkd.add_args)
    assert common.teacher_candidates(from_scratch, data)[0].name == "tv_resnet18_1ep.pth"


def test_pretrained_takes_a_state_dict_file_with_the_models_keys(tmp_path, monkeypatch):
    """timm's weights (or any ImageNet checkpoint) in a file: loaded strictly, then a new head."""
    torch.manual_seed(4)
    imagenet = models.create_model("mdistiller_mobilenetv1", 1000).state_dict()
    torch.save(imagenet, tmp_path / "mobilenetv1_imagenet.pth")
    state, record = common.pretrained_weights("mdistiller_mobilenetv1", str(tmp_path / "mobilenetv1_imagenet.pth"))
    model = common.start_from_weights("mdistiller_mobilenetv1", state, 10, torch.device("cpu"))
    head = models.classifier(model)
    assert head.out_features == 10 and record["accuracy"] is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in imagenet.items() if v.shape[:1] != (1000,))


class NotTensors:
    """A pickled object that a weights-only load refuses to run."""


@pytest.mark.parametrize("content, wanted", [
    ("tv_resnet34", "holds tv_resnet34 with 1000 classes, but tv_resnet18 with 1000 classes was asked for"),
    ("10 classes", "holds tv_resnet18 with 10 classes, but tv_resnet18 with 1000 classes was asked for"),
    ("truncated", "is not a readable PyTorch checkpoint"),
    ("unsafe pickle", "is not a readable PyTorch checkpoint (UnpicklingError); it must hold tensors only"),
    ("a list", "holds no state_dict"),
    ("an extra key", "is not a state_dict of tv_resnet18 with 1000 classes: its keys differ, 1 unexpected (e.g. "
                     "extra.weight)"),
    ("a missing key", "its keys differ, 1 missing (e.g. fc.bias)"),
    ("no such file", "checkpoint missing.pth does not exist"),
])
def test_every_bad_pretrained_file_is_one_line(content, wanted, tmp_path, monkeypatch, capsys):
    """--pretrained FILE reads through the teachers' loader (read_weights): one line for each bad file, none
    of torch's advice to load it unsafely, and a missing path is not taken for a torchvision weights name."""
    monkeypatch.chdir(tmp_path)
    state = models.create_model("tv_resnet18", 1000).state_dict()
    saved = {"tv_resnet34": models.create_model("tv_resnet34", 1000).state_dict(),
             "10 classes": models.create_model("tv_resnet18", 10).state_dict(),
             "unsafe pickle": {"model": NotTensors()}, "a list": [state["fc.bias"]],
             "an extra key": {**state, "extra.weight": torch.zeros(1)},
             "a missing key": {k: v for k, v in state.items() if k != "fc.bias"}}.get(content, state)
    if content != "no such file":
        torch.save(saved, tmp_path / "weights.pth")
    if content == "truncated":
        (tmp_path / "weights.pth").write_bytes((tmp_path / "weights.pth").read_bytes()[:5000])
    name = "missing.pth" if content == "no such file" else "weights.pth"
    message = refused(monkeypatch, capsys, common.main, "--model", "tv_resnet18", "--pretrained", name,
                      "--dataset", "synthetic", "--image-size", 32, "--train-subset", 100)
    assert wanted in message and "weights_only" not in message, message


def test_pretrained_is_for_imagenet_models(monkeypatch, capsys):
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", "--pretrained", "--dataset", "synthetic")
    assert message.startswith("error: --pretrained starts an ImageNet model from its 1000-class weights, and resnet8 "
                              "is a CIFAR model")

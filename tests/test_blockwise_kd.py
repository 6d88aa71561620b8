import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import blockwise_kd as bkd
import common
import models
from conftest import frozen, make_args
from models.resnet import CifarResNet
from models.token_models import mlp_mixer, vit
from models.wrn import WideResNet


def tiny(name, num_classes=10):
    """Small stand-ins with the zoo's structure, so that every test runs in seconds on a CPU."""
    torch.manual_seed(0)
    model = {"resnet": lambda: CifarResNet(8, (8, 8, 16, 32), num_classes),
             "wide_resnet": lambda: WideResNet(10, 1, num_classes),
             "narrow_resnet": lambda: CifarResNet(8, (8, 8, 12, 24), num_classes),
             "vit": lambda: vit(num_classes, dim=32, depth=3, heads=2, mlp_hidden=64),
             "mlp_mixer": lambda: mlp_mixer(num_classes, dim=32, depth=3, token_hidden=16, channel_hidden=64)}[name]()
    model.arch = name  # 'vit' / 'mlp_mixer' select the token recipe
    return model


def bkd_args(*argv):
    return make_args("--dataset", "synthetic", "--train-subset", 640, *argv, method_args=bkd.add_args)


def kd_by_hand(p, q, T):
    """sum_c softmax(p/T)_c (log softmax(p/T)_c - log softmax(q/T)_c), batch mean, times T^2."""
    log_p, log_q = F.log_softmax(p / T, 1), F.log_softmax(q / T, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean() * T * T


# ------------------------------------------------------------------------------------------- connectors

def test_connector_shapes():
    x = torch.randn(2, 16, 32, 32)
    shrink = bkd.Connector((16, 32, 32), (48, 8, 8), "map", "relu")
    assert shrink(x).shape == (2, 48, 8, 8) and (shrink(x) >= 0).all()
    grow = bkd.Connector((64, 8, 8), (32, 16, 16), "map", None)  # WRN-like teacher: no ReLU
    out = grow(torch.randn(2, 64, 8, 8))
    assert out.shape == (2, 32, 16, 16) and (out < 0).any()
    assert [type(m) for m in grow.project] == [nn.Conv2d, nn.BatchNorm2d]
    assert [type(m) for m in shrink.project] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert shrink.project[0].bias is None
    shrink.project = grow.project = nn.Identity()  # the resizing alone: average pooling down, bilinear up
    torch.testing.assert_close(shrink(x), F.adaptive_avg_pool2d(x, 8))
    small = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(grow(small), F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False))

    to_tokens = bkd.Connector((16, 32, 32), (64, 40), "tokens", None)  # map -> an 8x8 grid of tokens
    assert to_tokens(x).shape == (2, 64, 40)
    assert [type(m) for m in to_tokens.project] == [nn.Linear, nn.LayerNorm]
    to_map = bkd.Connector((64, 40), (16, 32, 32), "map", "relu")  # tokens -> a 32x32 map
    assert to_map(torch.randn(2, 64, 40)).shape == (2, 16, 32, 32)
    # Token order is the patch embedding's row-major order: token k lands at (k // 8, k % 8).
    plain = bkd.Connector((64, 3), (3, 8, 8), "map", None)
    plain.project = nn.Identity()
    tokens = torch.randn(1, 64, 3)
    assert torch.equal(plain(tokens)[0, :, 2, 5], tokens[0, 2 * 8 + 5])


@pytest.mark.parametrize("teacher_name,student_name", [
    ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"), ("resnet32x4", "resnet20"),
    ("resnet32x4", "mlp_mixer"), ("resnet32x4", "vit"), ("vit", "resnet8x4"), ("mlp_mixer", "wrn_16_2")])
def test_every_supported_pair_builds_its_stepping_stones(teacher_name, student_name):
    with torch.device("meta"):  # shapes only, no memory and no arithmetic
        teacher = frozen(models.create_model(teacher_name, 100))
        student = models.create_model(student_name, 100)
        stones = bkd.SteppingStones(teacher, student, [1, 2, 3])
        features, _ = models.stage_features(student, torch.zeros(2, 3, 32, 32))
        teacher_shapes = models.feature_shapes(teacher)
        for i in (1, 2, 3):
            connector = stones.connectors[str(i)]
            assert connector(features[i - 1]).shape[1:] == teacher_shapes[i - 1], i
            assert isinstance(connector.project[-1], nn.ReLU) == (teacher.stage_output_activation == "relu")
            assert stones(i, features[i - 1]).shape == (2, 100)


# ------------------------------------------------------------------------------------ stepping-stones

@pytest.mark.parametrize("name", ["resnet", "wide_resnet", "vit"])
def test_student_copy_of_teacher_gives_teacher_logits(name):
    teacher = frozen(tiny(name))
    student = copy.deepcopy(teacher).eval()
    stones = bkd.SteppingStones(teacher, student, [1, 2, 3], identity_connector=True)
    assert all(isinstance(c, nn.Identity) for c in stones.connectors.values())
    x = torch.randn(4, 3, 32, 32)
    features, _ = models.stage_features(student, x)
    expected = teacher(x)
    for i, logits in stones.all_logits(features).items():
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5, msg=f"N_{i}")


def test_stepping_stone_is_the_composition_of_its_parts():
    teacher, student = frozen(tiny("wide_resnet")), tiny("resnet").eval()
    stones = bkd.SteppingStones(teacher, student, [1, 2, 3]).eval()
    assert all(isinstance(c, bkd.Connector) for c in stones.connectors.values())
    x = torch.randn(4, 3, 32, 32)
    s1 = student.layer1(student.relu(student.bn1(student.conv1(x))))
    s2 = student.layer2(s1)
    s3 = student.layer3(s2)
    C = {i: stones.connectors[str(i)] for i in (1, 2, 3)}
    teacher_head = lambda h: teacher.fc(F.adaptive_avg_pool2d(F.relu(teacher.bn1(h)), 1).flatten(1))
    by_hand = {1: teacher_head(teacher.block3(teacher.block2(C[1](s1)))),
               2: teacher_head(teacher.block3(C[2](s2))),
               3: teacher_head(C[3](s3))}
    features, _ = models.stage_features(student, x)
    for i, logits in stones.all_logits(features).items():
        torch.testing.assert_close(logits, by_hand[i], msg=f"N_{i}")
    # C_i is Conv1x1 + BN (a WRN teacher's stage outputs are pre-activation: no ReLU).
    c = C[2]
    torch.testing.assert_close(c(s2), c.project[1](F.conv2d(s2, c.project[0].weight)))

    # Into a token teacher: C_i is resize to 8x8 + flatten row-major + Linear + LayerNorm, then blocks, head.
    teacher = frozen(tiny("vit"))
    stones = bkd.SteppingStones(teacher, student, [1, 2, 3]).eval()
    C = {i: stones.connectors[str(i)].project for i in (1, 2, 3)}
    token_head = lambda h: teacher.fc(teacher.norm(h).mean(1))
    tokens = lambda s: F.adaptive_avg_pool2d(s, 8).flatten(2).transpose(1, 2)
    by_hand = {1: token_head(teacher.blocks[2](teacher.blocks[1](C[1](tokens(s1))))),
               2: token_head(teacher.blocks[2](C[2](tokens(s2)))),
               3: token_head(C[3](tokens(s3)))}
    for i, logits in stones.all_logits(features).items():
        torch.testing.assert_close(logits, by_hand[i], msg=f"N_{i} into a ViT")


def test_teacher_frozen_and_every_stone_trains_the_first_stage(synthetic_data):
    teacher, student = frozen(tiny("wide_resnet")), tiny("resnet")
    teacher_before = copy.deepcopy(teacher.state_dict())
    args = bkd_args()
    stones = bkd.SteppingStones(teacher, student, [1, 2, 3])
    loss_fn = bkd.make_loss_fn(student, teacher, stones, args, ramp_epochs=1.0, label_smoothing=0.0)
    params = [p for m in (student, stones) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    student.train(), stones.train()  # what fit does with train_modules
    batches = common.train_batches(synthetic_data, 32, seed=0, epoch=0)
    for step in range(4):
        x, y = next(batches)
        loss, terms = loss_fn(x, y, progress=step / 4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert set(terms) == {"task", "distill", "cross", "ramp"}
    assert not any(m.training for m in teacher.modules())
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in after)  # weights and BatchNorm buffers
    assert any("running_mean" in k for k in after)
    assert stones.state_dict() and all(k.startswith("connectors.") for k in stones.state_dict())  # no teacher

    # Each stepping-stone path alone sends gradient into the student's first stage and its own connector.
    stage1 = list(student.stages()[0].parameters())
    for i in (1, 2, 3):
        student.zero_grad(), stones.zero_grad()
        features, _ = models.stage_features(student, x)
        F.cross_entropy(stones(i, features[i - 1]), y).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage1), f"N_{i}"
        assert all(p.grad is not None for p in stones.connectors[str(i)].parameters())
        assert all(p.grad is None for j in (1, 2, 3) if j != i for p in stones.connectors[str(j)].parameters())
        assert all(p.grad is None for p in student.fc.parameters())  # the student head is not in N_i


# ------------------------------------------------------------------------------------------- the loss

def test_no_stones_is_hinton_kd(synthetic_data):
    args = bkd_args("--stones", "none", "--gamma", 0, "--alpha", 0.1, "--beta", 0.9)
    assert bkd.resolve_ramp_epochs(args, bkd.parse_stones(args.stones, 3)) == 0
    teacher, student = frozen(tiny("wide_resnet")), tiny("resnet").eval()
    stones = bkd.SteppingStones(teacher, student, [])
    loss_fn = bkd.make_loss_fn(student, teacher, stones, args, ramp_epochs=0.0, label_smoothing=0.0)
    x, y = next(common.train_batches(synthetic_data, 16, seed=0, epoch=0))
    loss, terms = loss_fn(x, y, progress=0.0)
    s, t = student(x), teacher(x)
    expected = 0.1 * F.cross_entropy(s, y) + 0.9 * kd_by_hand(t, s, 4.0)
    torch.testing.assert_close(loss, expected)
    assert terms["cross"] == 0 and terms["ramp"] == 1


def test_stone_weights_ramp_and_cross_terms_are_exact():
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    z = {i: torch.randn(8, 10) for i in (1, 2, 3)}
    y = torch.randint(0, 10, (8,))
    T, (alpha, beta, gamma) = 2.0, (0.3, 0.7, 1.3)

    def by_hand(weights, cross_weights, ramp):
        ens = torch.stack([z[i] for i in weights]).mean(0)
        task = F.cross_entropy(s, y) + sum(w * F.cross_entropy(z[i], y) for i, w in weights.items())
        dist = kd_by_hand(t, s, T) + sum(w * kd_by_hand(t, z[i], T) for i, w in weights.items())
        cross = kd_by_hand(ens, s, T) + sum(w * kd_by_hand(ens, z[i], T) for i, w in cross_weights.items())
        return alpha * task + ramp * (beta * dist + gamma * cross)

    weights = dict(kd_temperature=T, alpha=alpha, beta=beta, gamma=gamma)
    ramp = bkd.warmup_factor(progress=1.5, ramp_epochs=6.0)
    assert ramp == 0.25 and bkd.warmup_factor(0, 6.0) == 0 and bkd.warmup_factor(6.0, 6.0) == 1
    assert bkd.warmup_factor(100, 6.0) == 1 and bkd.warmup_factor(0, 0) == 1
    loss, _ = bkd.blockkd_loss(s, t, z, y, num_stages=3, ramp=ramp, **weights)
    all_w = {1: 0.25, 2: 0.5, 3: 1.0}
    torch.testing.assert_close(loss, by_hand(all_w, all_w, ramp))
    some = {i: z[i] for i in (1, 3)}  # --stones 1,3: w_i keeps its stage index
    loss, _ = bkd.blockkd_loss(s, t, some, y, num_stages=3, ramp=1.0, **weights)
    torch.testing.assert_close(loss, by_hand({1: 0.25, 3: 1.0}, {1: 0.25, 3: 1.0}, 1.0))
    loss, terms = bkd.blockkd_loss(s, t, z, y, num_stages=3, ramp=1.0, cross_stone_weights=False, **weights)
    torch.testing.assert_close(loss, by_hand(all_w, {1: 1.0, 2: 1.0, 3: 1.0}, 1.0))
    assert terms["cross"] > 0 and terms["distill"] > 0

    assert [bkd.stone_weight(i, 3) for i in (1, 2, 3)] == [0.25, 0.5, 1.0]
    assert bkd.resolve_ramp_epochs(bkd_args(), [1, 2, 3]) == pytest.approx(20)  # --epochs 240
    assert bkd.resolve_ramp_epochs(bkd_args("--epochs", 24), [1, 2, 3]) == pytest.approx(2)
    assert bkd.resolve_ramp_epochs(bkd_args("--epochs", 24, "--ramp-epochs", 5), []) == 5
    assert bkd.parse_stones("all", 3) == [1, 2, 3] and bkd.parse_stones("none", 3) == []
    assert bkd.parse_stones("3,1", 3) == [1, 3]
    for bad in ("0", "4", "1,x", ""):
        with pytest.raises(ValueError, match="--stones"):
            bkd.parse_stones(bad, 3)


def test_ensemble_target_carries_no_gradient():
    torch.manual_seed(1)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    z = {i: torch.randn(8, 10, requires_grad=True) for i in (1, 2, 3)}
    only_cross = dict(num_stages=3, ramp=1.0, alpha=0.0, beta=0.0, gamma=1.0)
    loss, _ = bkd.blockkd_loss(s, t, z, y, **only_cross)
    detached = torch.autograd.grad(loss, list(z.values()))
    ens = torch.stack(list(z.values())).mean(0).detach()
    by_hand = sum(w * kd_by_hand(ens, z[i], 4.0) for i, w in {1: 0.25, 2: 0.5, 3: 1.0}.items())
    for got, want in zip(detached, torch.autograd.grad(by_hand, list(z.values()))):
        torch.testing.assert_close(got, want)
    loss, _ = bkd.blockkd_loss(s, t, z, y, detach_ensemble=False, **only_cross)
    through = torch.autograd.grad(loss, list(z.values()))
    assert not torch.allclose(through[0], detached[0])


# -------------------------------------------------------------------------------------- short runs

@pytest.fixture(scope="module")
def small_data(synthetic_data):
    """The 640 synthetic training images and 400 of the test images: a run's evaluation stays cheap."""
    d = synthetic_data
    return common.Data(d.train_x, d.train_y, d.test_x[:400], d.test_y[:400], d.num_classes,
                       d.mean.flatten().tolist(), d.std.flatten().tolist(), d.name)


# Constant learning rates and batch 32: the most learning for the fewest images on a CPU.
SHORT_RUN = ("--epochs", 2, "--batch-size", 32, "--schedule", "step", "--milestones", 99)


@pytest.fixture(scope="module")
def trained_teachers(small_data, tmp_path_factory):
    """A narrow CIFAR ResNet and a tiny ViT, each trained briefly: real but small knowledge."""
    teachers = {}
    for name, lr in (("resnet", 0.05), ("vit", 2e-3)):
        teacher = tiny(name)
        args = make_args("--dataset", "synthetic", *SHORT_RUN, "--lr", lr)
        common.fit(teacher, small_data, tmp_path_factory.mktemp(name), common.make_recipe(args, models.model_family(name)),
                   **common.run_options(args))
        teachers[name] = frozen(teacher)
    return teachers


@pytest.mark.parametrize("teacher_name,student_name", [("resnet", "narrow_resnet"), ("resnet", "mlp_mixer"),
                                                       ("vit", "narrow_resnet")])
def test_short_run_of_each_pair_family_learns(tmp_path, small_data, trained_teachers, teacher_name, student_name):
    teacher, student = trained_teachers[teacher_name], tiny(student_name)
    args = bkd_args(*SHORT_RUN, "--lr", 2e-3 if student_name == "mlp_mixer" else 0.05, "--out-dir", tmp_path)
    summary = bkd.distill(args, small_data, teacher, student)
    assert summary["last_acc"] > 20, summary["last_epoch"]  # chance is 10 % (+-1.5 % on 400 test images)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"task", "distill", "cross", "ramp", "stone1_acc", "stone2_acc", "stone3_acc"} <= set(rows[-1])
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["blockwise_kd"]["stones"] == [1, 2, 3] and saved["blockwise_kd"]["connector_params"] > 0
    assert saved["params"] == common.count_params(student)
    weights = torch.load(tmp_path / "model.pth", weights_only=True)["model"]
    assert set(weights) == set(student.state_dict())  # connectors are not in the saved student

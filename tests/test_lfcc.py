import json
import math

import pytest
import torch
import torch.nn as nn

import common
import lfcc
import models
from conftest import frozen, make_args
from models.token_models import mlp_mixer, vit


def lfcc_args(*argv):
    return make_args("--dataset", "synthetic", "--train-subset", 640, *argv, method_args=lfcc.add_args)


def tiny_token_model(name, num_classes=10):
    if name == "vit":
        model = vit(num_classes, dim=32, depth=3, heads=2, mlp_hidden=64)
    else:
        model = mlp_mixer(num_classes, dim=32, depth=3, token_hidden=16, channel_hidden=64)
    model.arch = name
    return model


# ------------------------------------------------------------------------------------- low-pass filter

def test_low_pass_of_a_constant_map_is_that_constant_at_every_scale():
    constant = torch.full((2, 3, 8, 8), 0.7)
    vec = lfcc.multiscale_low_pass(constant, [1, 2, 4])
    assert vec.shape == (2, 3 * 21)
    assert torch.allclose(vec, torch.full_like(vec, 0.7))
    odd = lfcc.multiscale_low_pass(torch.full((1, 2, 7, 7), -1.5), [1, 3, 5])  # windows that overlap
    assert torch.allclose(odd, torch.full_like(odd, -1.5))


def test_pooling_to_the_full_resolution_is_the_identity():
    x = torch.randn(2, 5, 8, 8)
    assert torch.equal(lfcc.multiscale_low_pass(x, [8]), x.flatten(1))
    # The 1x1 level is the spatial mean, the DC component of each channel.
    assert torch.allclose(lfcc.multiscale_low_pass(x, [1]), x.mean((2, 3)))


def test_maps_of_different_sizes_land_on_the_same_grids():
    cnn_map = torch.randn(2, 64, 32, 32)                  # a CIFAR ResNet stage 1
    tokens = torch.randn(2, 64, 128)                      # a Mixer stage: 8x8 tokens of 128 channels
    token_map = models.to_map(tokens)
    for s in (1, 2, 4):
        assert nn.functional.adaptive_avg_pool2d(cnn_map, s).shape[-2:] == (s, s)
        assert nn.functional.adaptive_avg_pool2d(token_map, s).shape[-2:] == (s, s)
    assert lfcc.multiscale_low_pass(cnn_map, [1, 2, 4]).shape == (2, 64 * 21)
    assert lfcc.multiscale_low_pass(token_map, [1, 2, 4]).shape == (2, 128 * 21)
    # A 32x32 map and its own 8x8 block average have exactly the same low-frequency vector: no interpolation.
    coarse = nn.functional.avg_pool2d(cnn_map, 4)
    assert torch.allclose(lfcc.multiscale_low_pass(cnn_map, [1, 2, 4]),
                          lfcc.multiscale_low_pass(coarse, [1, 2, 4]), atol=1e-5)


def test_the_no_lowpass_ablation_keeps_what_the_filter_removes():
    # A checkerboard is pure high frequency: every window of the pyramid averages it to zero.
    checkerboard = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2 * 2.0 - 1
    feature_map = checkerboard.expand(2, 3, 8, 8)
    assert torch.equal(lfcc.multiscale_low_pass(feature_map, [1, 2, 4]), torch.zeros(2, 3 * 21))
    # The ablation hands the projector the whole map, at its own resolution.
    assert torch.equal(lfcc.full_resolution(feature_map), feature_map.flatten(1))
    assert lfcc.full_resolution(torch.randn(2, 64, 32, 32)).shape == (2, 64 * 32 * 32)


def test_token_features_become_maps_and_back_without_loss():
    tokens = torch.randn(3, 64, 20)
    feature_map = models.to_map(tokens)
    assert feature_map.shape == (3, 20, 8, 8)
    assert torch.equal(models.to_tokens(feature_map), tokens)
    # Row-major: token 8*r + c is grid cell (r, c), as the patch embedding lays them out.
    assert torch.equal(feature_map[:, :, 2, 5], tokens[:, 8 * 2 + 5])
    x = torch.randn(3, 20, 8, 8)
    assert torch.equal(models.to_map(models.to_tokens(x)), x)


# ------------------------------------------------------------------------------------------- the loss

def test_info_nce_equals_a_hand_computation():
    z_student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    z_teacher = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    tau = 0.5
    S = [[1.6, 0.0, 2.0],      # z_s z_t^T / tau, written out
         [1.2, 2.0, 0.0],
         [1.92, 1.6, 1.2]]
    rows = [-S[i][i] + math.log(sum(math.exp(S[i][j]) for j in range(3))) for i in range(3)]
    cols = [-S[j][j] + math.log(sum(math.exp(S[i][j]) for i in range(3))) for j in range(3)]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    loss, rank_acc = lfcc.info_nce(z_student, z_teacher, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert rank_acc.item() == pytest.approx(100 / 3)  # only student 1's nearest teacher sample is its own


def test_info_nce_is_ln_b_for_random_and_zero_for_identical_separated_embeddings():
    g = torch.Generator().manual_seed(0)
    B = 256
    a = nn.functional.normalize(torch.randn(B, 128, generator=g), dim=1)
    b = nn.functional.normalize(torch.randn(B, 128, generator=g), dim=1)
    assert lfcc.info_nce(a, b, tau=1.0)[0].item() == pytest.approx(math.log(B), abs=0.05)
    # At tau 0.1 the spread of random similarities adds about var/2 = (1/sqrt(128)/0.1)^2 / 2 = 0.39.
    assert math.log(B) < lfcc.info_nce(a, b, tau=0.1)[0].item() < math.log(B) + 0.6
    one_hot = torch.eye(16, 128)
    loss, rank_acc = lfcc.info_nce(one_hot, one_hot, tau=0.1)
    assert loss.item() < 1e-3 and rank_acc.item() == 100.0


def test_info_nce_is_symmetric():
    g = torch.Generator().manual_seed(1)
    a = nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    b = nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    assert lfcc.info_nce(a, b, 0.1)[0].item() == pytest.approx(lfcc.info_nce(b, a, 0.1)[0].item(), rel=1e-6)


# ---------------------------------------------------------------------------------- flags and modules

def test_headline_defaults_and_flags():
    args = make_args(method_args=lfcc.add_args)
    assert (args.teacher, args.student) == ("resnet32x4", "mlp_mixer")
    assert (args.scales, args.stages, args.tau, args.proj_dim, args.alpha, args.beta, args.kd_temperature,
            args.loss, args.no_lowpass) == ([1, 2, 4], [1, 2, 3], 0.1, 128, 1.0, 1.0, 4.0, "infonce", False)
    assert make_args("-T", 2, method_args=lfcc.add_args).kd_temperature == 2.0
    low_pass = lfcc.make_filter(args)
    teacher = models.create_model("resnet32x4", 100)
    student = models.create_model("mlp_mixer", 100)
    assert lfcc.filtered_sizes(teacher, args.stages, low_pass) == [64 * 21, 128 * 21, 256 * 21]
    assert lfcc.filtered_sizes(student, args.stages, low_pass) == [128 * 21] * 3


def test_teacher_is_unchanged_and_projectors_of_both_sides_train(synthetic_data):
    args = lfcc_args("--teacher", "resnet8", "--student", "resnet8")
    recipe = common.make_recipe(args, "cnn")
    torch.manual_seed(0)
    teacher, student = frozen(models.create_model("resnet8", 10)), models.create_model("resnet8", 10)
    teacher.bn1.running_mean.normal_()  # not a fresh BN: a change of the buffers would show
    low_pass = lfcc.make_filter(args)
    space = lfcc.CompactSpace(lfcc.filtered_sizes(student, args.stages, low_pass),
                              lfcc.filtered_sizes(teacher, args.stages, low_pass), args.proj_dim)
    loss_fn = lfcc.make_loss_fn(args, recipe, student, teacher, space, low_pass)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    projector_before = [p.clone() for p in space.teacher.parameters()]
    optimizer = torch.optim.SGD(list(student.parameters()) + list(space.parameters()), lr=0.05)
    student.train(), space.train()  # as fit does; the teacher stays in eval mode
    batches = common.train_batches(synthetic_data, 32, seed=0, epoch=0)
    for _ in range(3):
        x, y = next(batches)
        loss, terms = loss_fn(x, y, 0.0)
        assert set(terms) == {"ce", "kd", "lfcc", "lfcc_s1", "lfcc_s2", "lfcc_s3",
                              "rank_acc_s1", "rank_acc_s2", "rank_acc_s3"}
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in space.parameters())
        assert student.conv1.weight.grad.abs().sum() > 0
        optimizer.step()
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not any(torch.equal(a, b) for a, b in zip(space.teacher.parameters(), projector_before))


def one_step(synthetic_data, teacher, student, *flags):
    """Build everything for the pair, run one loss evaluation and backward pass; return (args, terms, sizes)."""
    args = lfcc_args(*flags)
    low_pass = lfcc.make_filter(args)
    sizes = lfcc.filtered_sizes(teacher, args.stages, low_pass)
    space = lfcc.CompactSpace(lfcc.filtered_sizes(student, args.stages, low_pass), sizes, args.proj_dim)
    x, y = next(common.train_batches(synthetic_data, 16, seed=0, epoch=0))
    recipe = common.make_recipe(args, models.model_family(student.arch))
    loss, terms = lfcc.make_loss_fn(args, recipe, student, frozen(teacher), space, low_pass)(x, y, 0.0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    return args, terms, sizes


@pytest.mark.parametrize("teacher_name, student_name", [("vit", "wrn_16_1"), ("mlp_mixer", "vit"),
                                                        ("wrn_16_1", "resnet8")])
def test_every_family_pair_runs(synthetic_data, teacher_name, student_name):
    build = lambda name: (tiny_token_model(name) if models.model_family(name) == "token"
                          else models.create_model(name, 10))
    _, terms, _ = one_step(synthetic_data, build(teacher_name), build(student_name))
    assert terms["lfcc"].item() == pytest.approx(math.log(16), abs=1.5)  # near ln B at initialisation


@pytest.mark.parametrize("flags, size", [(["--no-lowpass"], 64 * 64), (["--loss", "mse"], 64 * 21),
                                          (["--scales", 1, 2, "--tau", 0.2], 64 * 5)])
def test_ablations_run(synthetic_data, flags, size):
    teacher, student = models.create_model("resnet8", 10), tiny_token_model("mlp_mixer")
    args, terms, sizes = one_step(synthetic_data, teacher, student, "--stages", 3, *flags)
    assert sizes == [size]
    assert set(terms) == {"ce", "kd", "lfcc", "lfcc_s3", "rank_acc_s3"}
    if "mse" in flags:  # squared distance of unit vectors
        assert 0 <= terms["lfcc"].item() <= 4


def test_similarities_are_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(2)
    a = nn.functional.normalize(torch.randn(32, 64, generator=g), dim=1)
    b = nn.functional.normalize(torch.randn(32, 64, generator=g), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = lfcc.info_nce(a, b, 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(lfcc.info_nce(a, b, 0.1)[0].item(), rel=1e-6)

    # The compact space (projector Linear, normalisation) runs in float32 too: under autocast its embeddings
    # are float32 and equal, bit for bit, to those computed without autocast, whether the filtered vectors
    # come in as float32 or as the bf16 that an autocast backbone produces.
    torch.manual_seed(0)
    space = lfcc.CompactSpace([63, 42], [84, 21], 16)
    student_vec, teacher_vec = torch.randn(8, 42), torch.randn(8, 21)
    for s, t in [(student_vec, teacher_vec), (student_vec.bfloat16(), teacher_vec.bfloat16())]:
        plain = space(1, s, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = space(1, s, t)
            assert nn.Linear(42, 16)(student_vec).dtype == torch.bfloat16  # autocast is on: a bare Linear rounds
        for z_plain, z_autocast in zip(plain, autocast):
            assert z_plain.dtype == z_autocast.dtype == torch.float32
            assert torch.equal(z_autocast, z_plain)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = lfcc.info_nce(*space(1, s, t), 0.1)
        assert loss.dtype == torch.float32 and torch.equal(loss, lfcc.info_nce(*plain, 0.1)[0])


# ------------------------------------------------------------------------------------ short training

@pytest.fixture(scope="module")
def small_data(synthetic_data):
    """The 640 synthetic training images and the first 500 test images: evaluation stays cheap."""
    d = synthetic_data
    return common.Data(d.train_x, d.train_y, d.test_x[:500], d.test_y[:500], d.num_classes,
                       d.mean.flatten().tolist(), d.std.flatten().tolist(), d.name)


@pytest.fixture(scope="module")
def cnn_teacher(small_data, tmp_path_factory):
    args = make_args("--dataset", "synthetic", "--train-subset", 640, "--epochs", 2)
    torch.manual_seed(0)
    teacher = models.create_model("resnet8", 10)
    common.fit(teacher, small_data, tmp_path_factory.mktemp("teacher"), common.make_recipe(args, "cnn"),
               **common.run_options(args))
    teacher.arch = "resnet8"
    return frozen(teacher)


@pytest.mark.parametrize("student_name", ["mlp_mixer", "vit"])
def test_cnn_to_token_student_learns_and_aligns(tmp_path, small_data, cnn_teacher, student_name):
    args = lfcc_args("--teacher", "resnet8", "--student", student_name, "--epochs", 3, "--lr", 2e-3,
                     "--out-dir", tmp_path)
    torch.manual_seed(0)
    student = tiny_token_model(student_name)
    teacher_before = {k: v.clone() for k, v in cnn_teacher.state_dict().items()}
    summary = lfcc.distill(args, small_data, cnn_teacher, student)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert summary["last_acc"] > 20 and last["ce"] < first["ce"]  # chance is 10 %
    for k in (1, 2, 3):
        # Training batches of 128 (chance 0.8 %), test batches of 500 (chance 0.2 %).
        assert last[f"rank_acc_s{k}"] > max(10, first[f"rank_acc_s{k}"])
        assert last[f"test_rank_acc_s{k}"] > 5
        assert last[f"lfcc_s{k}"] < first[f"lfcc_s{k}"] < math.log(128) + 1
    assert all(torch.equal(v, teacher_before[k]) for k, v in cnn_teacher.state_dict().items())
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["method"] == "lfcc" and saved["lfcc"]["student"] == student_name
    # model.pth holds the student alone; the projectors live in the resumable checkpoint.
    model_keys = set(torch.load(tmp_path / "model.pth", weights_only=True)["model"])
    assert model_keys == set(student.state_dict())
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    space = lfcc.make_compact_space(student, cnn_teacher, args.stages, lfcc.make_filter(args), args.proj_dim)
    assert set(checkpoint["train_modules"][1]) == set(space.state_dict())

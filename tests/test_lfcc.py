"""LFCC (lfcc.py): the low-pass filter, InfoNCE, the projectors, --per-scale and --reduce-channels, runs."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import blockwise_kd as bkd
import common
import lfcc
import models
from conftest import changed_keys, frozen, make_args, method_run, snapshot, tiny_model, train_steps


def lfcc_args(*argv):
    return make_args("--dataset", "synthetic", "--train-subset", 640, *argv, method_args=lfcc.add_args)


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
    assert lfcc.multiscale_low_pass(cnn_map, [1, 2, 4]).shape == (2, 64 * 21)
    assert lfcc.multiscale_low_pass(token_map, [1, 2, 4]).shape == (2, 128 * 21)
    # The 1x1 level of a token grid is the mean over the tokens; a 2x2 cell, the mean of its 4x4 tokens.
    torch.testing.assert_close(lfcc.multiscale_low_pass(token_map, [1]), tokens.mean(1))
    top_left = [8 * r + c for r in range(4) for c in range(4)]
    torch.testing.assert_close(lfcc.multiscale_low_pass(token_map, [2]).view(2, 128, 4)[:, :, 0],
                               tokens[:, top_left].mean(1))
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
    teacher, student = frozen(tiny_model("resnet8", seed=0)), tiny_model("resnet8")
    with torch.no_grad():  # not a fresh BN: a change of the buffers would show
        teacher.bn1.running_mean.normal_()
    low_pass = lfcc.make_filter(args)
    space = lfcc.make_compact_space(student, teacher, args.stages, low_pass, args.proj_dim)
    loss_fn = lfcc.make_loss_fn(args, recipe, student, teacher, space, low_pass)
    teacher_before, space_before = snapshot(teacher), snapshot(space)
    # What fit does with distill's train_modules [student, compact space]: every trainable parameter they
    # give is optimised, and they are put in train mode.
    batches = synthetic_data.train_batches(32, seed=0, epoch=0)
    optimizer, terms = train_steps(student, [student, space], loss_fn, [next(batches) for _ in range(3)])
    assert set(terms[-1]) == {"ce", "kd", "lfcc", "lfcc_s1", "lfcc_s2", "lfcc_s3",
                              "rank_acc_s1", "rank_acc_s2", "rank_acc_s3"}
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for m in (student, space) for p in m.parameters()}  # no teacher parameter
    # The last step's gradients reached every projector, of both sides, and the student's stem.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in space.parameters())
    assert student.conv1.weight.grad.abs().sum() > 0
    assert not any(m.training for m in teacher.modules())
    assert changed_keys(teacher, teacher_before) == set()  # weights and BatchNorm buffers
    assert changed_keys(space, space_before) == set(space_before)  # every projector weight and bias moved
    assert any(k.startswith("teacher.") for k in space_before)


def one_step(synthetic_data, teacher, student, *flags):
    """Build everything for the pair, run one loss evaluation and backward pass; return (args, terms, sizes)."""
    args = lfcc_args(*flags)
    low_pass = lfcc.make_filter(args)
    sizes = lfcc.filtered_sizes(teacher, args.stages, low_pass)
    space = lfcc.CompactSpace(lfcc.filtered_sizes(student, args.stages, low_pass), sizes, args.proj_dim)
    x, y = next(synthetic_data.train_batches(16, seed=0, epoch=0))
    recipe = common.make_recipe(args, models.model_family(student.arch))
    loss, terms = lfcc.make_loss_fn(args, recipe, student, frozen(teacher), space, low_pass)(x, y, 0.0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    return args, terms, sizes


@pytest.mark.parametrize("teacher_name, student_name", [("vit", "wrn_16_1"), ("mlp_mixer", "vit"),
                                                        ("wrn_16_1", "resnet8")])
def test_every_family_pair_runs(synthetic_data, teacher_name, student_name):
    _, terms, _ = one_step(synthetic_data, tiny_model(teacher_name, seed=0), tiny_model(student_name, seed=1))
    assert terms["lfcc"].item() == pytest.approx(math.log(16), abs=1.5)  # near ln B at initialisation


@pytest.mark.parametrize("flags, size", [(["--no-lowpass"], 64 * 64), (["--loss", "mse"], 64 * 21),
                                          (["--scales", 1, 2, "--tau", 0.2], 64 * 5)])
def test_ablations_run(synthetic_data, flags, size, monkeypatch):
    calls = {"info_nce": [], "mse_alignment": []}
    for name in calls:
        def recorded(z_student, z_teacher, tau, real=getattr(lfcc, name), name=name, **kw):
            calls[name].append(real(z_student, z_teacher, tau, **kw))
            return calls[name][-1]
        monkeypatch.setattr(lfcc, name, recorded)
    teacher, student = tiny_model("resnet8", seed=0), tiny_model("mlp_mixer", seed=1)
    args, terms, sizes = one_step(synthetic_data, teacher, student, "--stages", 3, *flags)
    assert sizes == [size]
    assert set(terms) == {"ce", "kd", "lfcc", "lfcc_s3", "rank_acc_s3"}
    # The alignment that --loss names, once for the one stage, is what is logged.
    used, unused = ("mse_alignment", "info_nce") if "mse" in flags else ("info_nce", "mse_alignment")
    assert len(calls[used]) == 1 and not calls[unused]
    assert torch.equal(terms["lfcc"], calls[used][0][0]) and torch.equal(terms["rank_acc_s3"], calls[used][0][1])


def unit(*degrees):
    """2-d unit vectors at these angles."""
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_mse_alignment_is_the_squared_distance_of_the_unit_vectors():
    e = torch.eye(3)
    assert lfcc.mse_alignment(e, e)[0].item() == 0 and lfcc.mse_alignment(e, e)[1].item() == 100
    assert lfcc.mse_alignment(e, -e)[0].item() == 4  # opposite
    assert lfcc.mse_alignment(e, e[[1, 2, 0]])[0].item() == 2  # orthogonal
    # The batch mean of one identical, one opposite and one orthogonal pair.
    assert lfcc.mse_alignment(e, torch.stack([e[0], -e[1], e[0]]))[0].item() == 2
    # 60 degrees apart: 2 - 2 cos 60 = 1.
    assert lfcc.mse_alignment(unit(0), unit(60))[0].item() == pytest.approx(1.0, abs=1e-6)
    # Rank accuracy: students at 0, 90 and 45 degrees, teachers at 10, 70 and 130: students 0 and 1 are
    # nearest to their own teacher sample, student 2 (35, 25, 85 degrees away) to teacher 1.
    assert lfcc.mse_alignment(unit(0, 90, 45), unit(10, 70, 130))[1].item() == pytest.approx(200 / 3)


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

@pytest.mark.parametrize("student_name", ["mlp_mixer", "vit"])
def test_cnn_to_token_student_learns_and_aligns(tmp_path, small_data, trained_teacher, student_name):
    args = lfcc_args("--teacher", "resnet8", "--student", student_name, "--epochs", 3, "--lr", 2e-3,
                     "--out-dir", tmp_path)
    student = tiny_model(student_name, seed=0)
    teacher_before = snapshot(trained_teacher)
    summary = lfcc.distill(args, small_data, trained_teacher, student)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert summary["last_acc"] > 20 and last["ce"] < first["ce"]  # chance is 10 %
    for k in (1, 2, 3):
        # Training batches of 128 (chance 0.8 %), test batches of 500 (chance 0.2 %).
        assert last[f"rank_acc_s{k}"] > max(10, first[f"rank_acc_s{k}"])
        assert last[f"test_rank_acc_s{k}"] > 5
        assert last[f"lfcc_s{k}"] < first[f"lfcc_s{k}"] < math.log(128) + 1
    assert changed_keys(trained_teacher, teacher_before) == set()  # BatchNorm buffers included
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["method"] == "lfcc" and saved["lfcc"]["student"] == student_name
    # model.pth holds the student alone; the projectors live in the resumable checkpoint.
    model_keys = set(torch.load(tmp_path / "model.pth", weights_only=True)["model"])
    assert model_keys == set(student.state_dict())
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    space = lfcc.make_compact_space(student, trained_teacher, args.stages, lfcc.make_filter(args), args.proj_dim)
    assert set(checkpoint["train_modules"][1]) == set(space.state_dict())


def test_lfcc_script(finished_runs, workdir):
    summary, weights, teacher = method_run(finished_runs, workdir, "lfcc")
    assert summary["epochs"] == 1
    method = summary["lfcc"]
    assert (method["teacher"], method["student"], method["stages"]) == ("resnet8", "resnet8", [1, 2, 3])
    assert method["projector_params"] > 0
    assert {"ce", "kd", "lfcc", "test_rank_acc_s1", "test_rank_acc_s3"} <= set(summary["last_epoch"])
    assert not torch.equal(weights["conv1.weight"], teacher["conv1.weight"])


def test_ce_kd_control_is_the_same_loss_and_gradient_in_blockkd_and_lfcc(synthetic_data):
    torch.manual_seed(0)
    teacher = frozen(models.create_model("resnet8", 10))
    student = models.create_model("resnet8", 10)
    x, y = next(synthetic_data.train_batches(16, seed=0, epoch=0))

    bkd_args = make_args("--stones", "none", "--gamma", 0, method_args=bkd.add_args)
    stones = bkd.SteppingStones(teacher, student, [])
    bkd_loss, _ = bkd.make_loss_fn(student, teacher, stones, bkd_args, ramp_epochs=0.0, label_smoothing=0.0)(x, y, 0.0)
    bkd_loss.backward()
    bkd_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)

    lfcc_args = make_args("--beta", 0, method_args=lfcc.add_args)
    low_pass = lfcc.make_filter(lfcc_args)
    space = lfcc.CompactSpace(lfcc.filtered_sizes(student, [1, 2, 3], low_pass),
                              lfcc.filtered_sizes(teacher, [1, 2, 3], low_pass), lfcc_args.proj_dim)
    recipe = common.make_recipe(lfcc_args, "cnn")
    lfcc_loss, terms = lfcc.make_loss_fn(lfcc_args, recipe, student, teacher, space, low_pass)(x, y, 0.0)
    lfcc_loss.backward()

    assert terms["lfcc"] > 1  # the contrastive term is computed, only weighted by 0
    assert torch.equal(lfcc_loss, bkd_loss)
    assert all(torch.equal(p.grad, g) for p, g in zip(student.parameters(), bkd_grads))


def pair():
    torch.manual_seed(0)
    return frozen(models.create_model("resnet8", 10)), models.create_model("resnet8", 10)


def test_per_scale_filter_gives_one_vector_per_scale_and_sizes_in_stage_major_order():
    feature_map = torch.randn(2, 5, 8, 8)
    parts = lfcc.low_pass_per_scale(feature_map, [1, 2, 4])
    assert [p.shape for p in parts] == [(2, 5), (2, 20), (2, 80)]
    # Together they are exactly the default filter's concatenated vector.
    assert torch.equal(torch.cat(parts, 1), lfcc.multiscale_low_pass(feature_map, [1, 2, 4]))
    teacher, _ = pair()
    args = make_args("--per-scale", method_args=lfcc.add_args)
    widths = [c for c, *_ in models.feature_shapes(teacher)]  # resnet8: 16, 32, 64
    assert lfcc.filtered_sizes(teacher, [1, 3], lfcc.make_filter(args)) == [
        widths[0] * 1, widths[0] * 4, widths[0] * 16, widths[2] * 1, widths[2] * 4, widths[2] * 16]


def test_stage_loss_is_the_mean_of_the_per_scale_info_nce():
    teacher, student = pair()
    args = make_args("--per-scale", "--stages", 2, 3, method_args=lfcc.add_args)
    low_pass = lfcc.make_filter(args)
    space = lfcc.make_compact_space(student, teacher, args.stages, low_pass, 16)
    assert len(space.student) == len(space.teacher) == 2 * 3  # two stages x three scales
    x = torch.randn(6, 3, 32, 32)
    _, _, per_stage = lfcc.stage_alignment(x, student, teacher, space, low_pass, stages=args.stages)

    student_features, _ = models.stage_features(student, x)
    teacher_features, _ = models.stage_features(teacher, x)
    for index, k in enumerate(args.stages):
        def pooled(features, s):
            return F.adaptive_avg_pool2d(features[k - 1], s).flatten(1)
        by_scale = [lfcc.info_nce(*space(index, pooled(student_features, s), pooled(teacher_features, s), part=j), 0.1)
                    for j, s in enumerate([1, 2, 4])]
        loss, rank_acc = per_stage[index]
        torch.testing.assert_close(loss, torch.stack([l for l, _ in by_scale]).mean())
        torch.testing.assert_close(rank_acc, torch.stack([a for _, a in by_scale]).mean())
    # Every projector of every scale receives gradient from the averaged loss.
    torch.stack([loss for loss, _ in per_stage]).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in space.parameters())


def test_one_scale_per_scale_is_the_default_bit_for_bit():
    teacher, student = pair()
    x = torch.randn(6, 3, 32, 32)
    losses = []
    for flags in ([], ["--per-scale"]):
        args = make_args("--scales", 2, *flags, method_args=lfcc.add_args)
        low_pass = lfcc.make_filter(args)
        torch.manual_seed(1)
        space = lfcc.make_compact_space(student, teacher, args.stages, low_pass, 16)
        losses.append([loss for loss, _ in lfcc.stage_alignment(x, student, teacher, space, low_pass)[2]])
    assert all(torch.equal(a, b) for a, b in zip(*losses))


def test_per_scale_with_no_lowpass_is_refused(capsys):
    with pytest.raises(SystemExit):
        lfcc.main(["--dataset", "synthetic", "--per-scale", "--no-lowpass"])
    assert "--per-scale aligns the scales of the low-pass filter one by one" in capsys.readouterr().err


@pytest.mark.parametrize("height, width", [(16, 16), (5, 5), (7, 3), (2, 2), (1, 1)])  # windows that overlap;
def test_the_reduction_commutes_with_the_low_pass_filter(height, width):                 # grids finer than the map
    torch.manual_seed(0)
    reduce = lfcc.ChannelReduction(12, 5)
    feature_map = torch.randn(3, 12, height, width)
    reduced_then_filtered = lfcc.multiscale_low_pass(reduce(feature_map), [1, 2, 4])
    # The same conv applied to each s x s grid of the unreduced map's low-pass pyramid.
    filtered_then_reduced = torch.cat([reduce(F.adaptive_avg_pool2d(feature_map, s)).flatten(1) for s in (1, 2, 4)], 1)
    torch.testing.assert_close(reduced_then_filtered, filtered_then_reduced, rtol=0, atol=1e-5)
    assert reduced_then_filtered.shape == (3, 5 * 21)


def test_only_stages_wider_than_r_are_reduced_and_the_projectors_shrink_to_21_r_inputs():
    teacher, student = pair()
    low_pass = lfcc.make_filter(make_args(method_args=lfcc.add_args))
    space = lfcc.make_compact_space(student, teacher, [1, 2, 3], low_pass, 128, reduce_channels=32)
    # 16 channels pass unchanged; 32 is not wider than 32; 64 -> 32.
    kinds = [type(r).__name__ for r in space.teacher_reduce]
    assert kinds == [type(r).__name__ for r in space.student_reduce] == ["Identity", "Identity", "ChannelReduction"]
    assert space.teacher_reduce[2].conv.weight.shape == (32, 64, 1, 1)
    assert [p.in_features for p in space.teacher] == [16 * 21, 32 * 21, 32 * 21]
    # Exact count: 6 projectors Linear(21*C -> 128) plus two 64 -> 32 convolutions without bias.
    expected = 2 * sum(21 * c * 128 + 128 for c in (16, 32, 32)) + 2 * 64 * 32
    assert common.count_params(space) == expected == 434_944


def test_narrow_pairs_get_the_space_they_had_before_the_flag_bit_for_bit():
    teacher, student = pair()
    low_pass = lfcc.make_filter(make_args(method_args=lfcc.add_args))
    torch.manual_seed(1)
    default = lfcc.make_compact_space(student, teacher, [1, 2, 3], low_pass, 16)  # R = 256 > 64 channels
    after_default = torch.rand(3)
    torch.manual_seed(1)  # the space as it was built before --reduce-channels existed
    before = lfcc.CompactSpace(lfcc.filtered_sizes(student, [1, 2, 3], low_pass),
                               lfcc.filtered_sizes(teacher, [1, 2, 3], low_pass), 16)
    assert torch.equal(torch.rand(3), after_default)  # the Identity stages drew no random numbers
    assert default.state_dict().keys() == before.state_dict().keys()  # old checkpoints still load
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), before.state_dict().values()))
    x = torch.randn(4, 3, 32, 32)
    losses = [lfcc.stage_alignment(x, student, teacher, space, low_pass)[2] for space in (default, before)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*losses))


def test_both_reductions_learn_from_the_alignment_while_the_teacher_gets_no_gradient():
    teacher, student = pair()
    low_pass = lfcc.make_filter(make_args(method_args=lfcc.add_args))
    space = lfcc.make_compact_space(student, teacher, [2, 3], low_pass, 16, reduce_channels=8)
    _, _, per_stage = lfcc.stage_alignment(torch.randn(6, 3, 32, 32), student, teacher, space, low_pass,
                                           stages=[2, 3])
    torch.stack([loss for loss, _ in per_stage]).mean().backward()
    for reduce in [*space.student_reduce, *space.teacher_reduce]:
        assert reduce.conv.weight.grad is not None and reduce.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert next(student.parameters()).grad.abs().sum() > 0  # the student's stem, through the reduction


def test_the_reduction_runs_in_float32_under_bf16_autocast():
    reduce = lfcc.ChannelReduction(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reduce(torch.randn(2, 8, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.float32


def test_a_wide_teacher_gets_a_small_space():
    # vgg13's stages have 128, 256 and 512 channels; only the 512 is reduced at the default R = 256.
    teacher, student = frozen(models.create_model("vgg13", 100)), models.create_model("MobileNetV2", 100)
    low_pass = lfcc.make_filter(make_args(method_args=lfcc.add_args))
    sizes = {r: common.count_params(lfcc.make_compact_space(student, teacher, [1, 2, 3], low_pass, 128, r))
             for r in (0, 256, 64)}
    assert sizes == {0: 2_613_504, 256: 2_056_448, 64: 778_496}  # as in the README's table of the 13 pairs
    kinds = [type(r).__name__ for r in lfcc.channel_reductions(teacher, [1, 2, 3], 256)]
    assert kinds == ["Identity", "Identity", "ChannelReduction"]

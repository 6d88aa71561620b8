"""LFCC's --per-scale reading: one projector pair and one InfoNCE per scale of the low-pass filter, averaged."""
import pytest
import torch
import torch.nn.functional as F

import lfcc
import models
from conftest import frozen, make_args


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

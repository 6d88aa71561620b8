"""LFCC's --reduce-channels: a learned 1x1 conv that brings a wide stage output to R channels before the filter."""

import pytest
import torch
import torch.nn.functional as F

import common
import lfcc
import models
from conftest import frozen, make_args


def pair():
    torch.manual_seed(0)
    return frozen(models.create_model("resnet8", 10)), models.create_model("resnet8", 10)  # 16, 32, 64 channels


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

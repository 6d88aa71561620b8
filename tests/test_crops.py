"""Resized crops in batches (plumbing/crops.py): torchvision's box law and bilinear resize for all samples at once."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T

import common


def test_resized_crops_equal_bilinear_interpolation_of_each_crop():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 24, 32), dtype=torch.uint8, generator=g)  # not square
    boxes = common.resized_crop_boxes(16, 24, 32, (0.08, 1), (3 / 4, 4 / 3), g)
    out = common.resized_crops(images, boxes, 56)
    assert out.shape == (16, 3, 56, 56) and out.dtype == torch.float32
    for image, (top, left, h, w), crop in zip(images, boxes.tolist(), out):
        expected = F.interpolate(image[None, :, top:top + h, left:left + w].float(), size=56, mode="bilinear",
                                 align_corners=False)[0]
        torch.testing.assert_close(crop, expected, atol=1e-3, rtol=0)
    # The whole image as its box is a plain resize; a 1x1 box is that pixel everywhere.
    whole = torch.tensor([[0, 0, 24, 32]])
    torch.testing.assert_close(common.resized_crops(images[:1], whole, 56),
                               F.interpolate(images[:1].float(), size=56, mode="bilinear"), atol=1e-3, rtol=0)
    pixel = common.resized_crops(images[:1], torch.tensor([[5, 7, 1, 1]]), 8)
    assert torch.equal(pixel, images[:1, :, 5:6, 7:8].float().expand(1, 3, 8, 8))


@pytest.mark.parametrize("channels_last", [False, True])
def test_resized_crops_flip_and_normalise_as_their_parts_in_either_memory_format(channels_last):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    boxes = common.resized_crop_boxes(12, 32, 32, (0.08, 1), (3 / 4, 4 / 3), g)
    flips = torch.rand(12, generator=g) < 0.5
    plain = common.resized_crops(images, boxes, 48)
    out = common.resized_crops(images, boxes, 48, flips, channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out, torch.where(flips[:, None, None, None], plain.flip(3), plain), atol=1e-3, rtol=0)
    # Normalising the 32x32 images first is normalising the crops (every row of the weights sums to 1).
    mean, std = torch.tensor([120.0, 110.0, 100.0]).view(1, 3, 1, 1), torch.tensor([60.0, 55.0, 50.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(common.resized_crops((images - mean) / std, boxes, 48), (plain - mean) / std,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("height, width", [(32, 32), (20, 50)])
def test_crop_boxes_stay_within_the_image_and_follow_the_scale_and_ratio_bounds(height, width):
    scale, ratio = (0.2, 0.6), (0.5, 2.0)
    boxes = common.resized_crop_boxes(20000, height, width, scale, ratio, torch.Generator().manual_seed(1))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert (h >= 1).all() and (w >= 1).all()
    # Rounding h and w to pixels moves the area and the ratio by at most about half a pixel per side. The
    # fallback, where none of ten tries fits (often on 20x50: a tall crop is rarely short enough), is
    # torchvision's whole-image one: here 40x20, centred.
    fallback = torch.tensor([0, 5, 20, 40]) if width > height else torch.tensor([0, 0, 32, 32])
    drawn = ~(boxes == fallback).all(1)
    assert drawn.float().mean() > 0.5
    h, w = h[drawn], w[drawn]
    area, aspect = (h * w).float() / (height * width), w.float() / h.float()
    slack = 1 / min(h.min().item(), w.min().item())
    assert area.min() >= scale[0] * (1 - slack) ** 2 and area.max() <= scale[1] * (1 + slack) ** 2
    assert aspect.min() >= ratio[0] * (1 - slack) / (1 + slack) and aspect.max() <= ratio[1] * (1 + slack) / (1 - slack)


def test_crop_boxes_have_the_distribution_of_torchvisions_random_resized_crop():
    n = 20000
    ours = common.resized_crop_boxes(n, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [0.08, 1.0], [3 / 4, 4 / 3])
                           for _ in range(n)])
    def readings(boxes):  # per box: area fraction, log aspect ratio, top, left, whole-height crop
        top, left, h, w = boxes.double().T
        return torch.stack([h * w / 1024, (w / h).log(), top, left, (h == 32).double()], 1)
    a, b = readings(ours), readings(theirs)
    standard_error = ((a.var(0) + b.var(0)) / n).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 4 * standard_error).all(), (a.mean(0), b.mean(0))
    assert ((a.std(0) - b.std(0)).abs() < 0.03 * b.std(0) + 1e-9).all(), (a.std(0), b.std(0))


def test_a_box_that_never_fits_falls_back_to_torchvisions_centred_crop():
    boxes = common.resized_crop_boxes(5, 32, 32, (0.99, 1.0), (3.0, 4.0), torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    expected = T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [0.99, 1.0], [3.0, 4.0])
    assert boxes.tolist() == [list(expected)] * 5 == [[10, 0, 11, 32]] * 5


def test_resized_crop_boxes_take_each_images_own_size():
    heights, widths = torch.tensor([40, 300, 100]).repeat(2000), torch.tensor([300, 40, 100]).repeat(2000)
    boxes = common.resized_crop_boxes(6000, heights, widths, (0.08, 1.0), (3 / 4, 4 / 3),
                                      torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= heights).all() and (left + w <= widths).all()
    single = common.resized_crop_boxes(2000, 100, 100, (0.08, 1.0), (3 / 4, 4 / 3),
                                       torch.Generator().manual_seed(0))
    square = boxes[2::3]
    assert abs(square[:, 2:].float().mean() - single[:, 2:].float().mean()) < 2  # the same law

"""Random resized crops done in batches on the device, for images kept smaller than the models' input (CIFAR
at 224 px): torchvision's RandomResizedCrop box law for many images at once, and every crop resized by two
batched matrix products. Ours, not torchvision's per-image transform, for speed on the device; the law and
the bilinear weights are torchvision's and PyTorch's (tests/test_crops.py)."""
import math

import torch


def resized_crop_boxes(n, height, width, scale, ratio, generator):
    """torchvision's RandomResizedCrop.get_params for n images at once (of one size, or of (n,) heights and
    widths): an (n, 4) int64 tensor of (top, left, h, w). Ten tries each of an area fraction ~ U(scale) and
    a log aspect ratio ~ U(log ratio); the first that fits the image is taken, else (all ten fail) the whole
    image, its ratio clamped into `ratio`, centred: torchvision's fallback."""
    height = torch.as_tensor(height, dtype=torch.float64).expand(n)[:, None]
    width = torch.as_tensor(width, dtype=torch.float64).expand(n)[:, None]
    target = height * width * torch.empty(n, 10).uniform_(scale[0], scale[1], generator=generator).double()
    log_ratio = torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.double().exp()
    w, h = (target * aspect).sqrt().round(), (target / aspect).sqrt().round()  # round half to even, as Python
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    w, h = w.gather(1, first), h.gather(1, first)
    where = torch.rand(n, 2, generator=generator).double()
    top, left = (where[:, :1] * (height - h + 1)).floor(), (where[:, 1:] * (width - w + 1)).floor()
    narrow, wide = width / height < ratio[0], width / height > ratio[1]
    fallback_w = torch.where(wide, (height * ratio[1]).round(), width)
    fallback_h = torch.where(narrow, (width / ratio[0]).round(), height)
    fallback = torch.cat([((height - fallback_h) / 2).floor(), ((width - fallback_w) / 2).floor(), fallback_h,
                          fallback_w], 1)
    boxes = torch.cat([top, left, h, w], 1)
    return torch.where(fits.any(1, keepdim=True), boxes, fallback).long()


def resized_crops(images, boxes, size, flips=None, channels_last=False):
    """Each image's box (top, left, h, w) resized to size x size, bilinearly, and mirrored where `flips`:
    for every image what F.interpolate(crop, size, mode="bilinear", align_corners=False) gives for its crop
    (no antialiasing; the crops are upsampled), in float. Separable, as two batched matrix products: rows
    R (size x H) and columns C (size x W), two non-zero weights per row, out = R @ image @ C^T, the columns
    first (on the small image), the rows last, straight into the output's memory format (no copy of the
    large output). Every row of R and C sums to 1, so normalising the small images first normalises the
    output."""
    n, c, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    rows = interpolation_matrix(top, h, height, size)
    cols = interpolation_matrix(left, w, width, size)
    if flips is not None:
        cols = torch.where(flips[:, None, None], cols.flip(1), cols)
    narrow = torch.bmm(images.float().reshape(n, c * height, width), cols.transpose(1, 2))  # (n, c*H, size)
    if channels_last:  # (n, H, size*c) rows last: the output as (n, size, size, c)
        narrow = narrow.view(n, c, height, size).permute(0, 2, 3, 1).reshape(n, height, size * c)
        return torch.bmm(rows, narrow).view(n, size, size, c).permute(0, 3, 1, 2)
    narrow = narrow.view(n * c, height, size)
    rows = rows[:, None].expand(n, c, size, height).reshape(n * c, size, height)
    return torch.bmm(rows, narrow).view(n, c, size, size)


def interpolation_matrix(start, length, extent, size):
    """(n, size, extent) weights of bilinear interpolation (align_corners=False, PyTorch's rule) from the
    pixels [start, start + length) of each image to `size` output pixels."""
    ramp = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    source = (ramp * (length[:, None].float() / size) - 0.5).clamp(min=0)
    low = source.floor()
    weight = (source - low)[..., None]
    low = low.long()
    high = torch.minimum(low + 1, length[:, None] - 1)
    taps = torch.arange(extent, device=start.device)
    return ((start[:, None] + low)[..., None] == taps) * (1 - weight) + \
        ((start[:, None] + high)[..., None] == taps) * weight

"""What the three method scripts share: data on the device, the recipes, the training step and loop (`fit`),
then, below one banner, the bookkeeping a reader of the methods can skip.

Run alone it trains one model with the standard recipe (teachers and the plain-student baselines):

    python common.py --model resnet32x4                       # CIFAR-100, 240 epochs, SGD recipe
    python common.py --model resnet8 --dataset folder --data-dir ~/data/cifar10 --train-subset 5000 \\
        --epochs 20
    python common.py --model tv_swin_t --pretrained --dataset cifar100 --image-size 224 --epochs 30 \\
        --save-as-teacher                              # an ImageNet teacher fine-tuned (OFA-KD's protocol)

Where to look: the training step is `make_train_step` (forward and loss, backward, clipping, optimizer
step), the loop is `fit`, right below it; a method calls `fit` with its loss_fn, train_modules and eval_fn.

Data: the whole dataset is a uint8 tensor on the training device; crop (4-pixel zero padding), flip and
normalisation run batched there, driven by a generator seeded with (seed, epoch), so an epoch's batches
are the same whether a run was resumed or not. Images kept smaller than the models' input (CIFAR at 224)
get a RandomResizedCrop per sample there (resized_crop_boxes; resized_crops, two matrix products).
ImageNet, and folders too large for the device, are streamed (StreamedData): worker processes decode and
crop each epoch's plan, drawn from (seed, epoch) in the main process, so the batches do not depend on the
number of workers. Training: evaluation every epoch (or every `--eval-every`); `metrics.jsonl`,
`summary.json`, a resumable `checkpoint.pt` written atomically every epoch, and the final model in the
benchmark format `{'model': state_dict, 'epoch', 'accuracy'}` as `model.pth`.

Fast paths, decided in one place (`fast_paths`) and named in every run's first log line: `--amp bf16|off`
(bf16 autocast; default bf16 on CUDA, off on CPU), `--channels-last` (default on),
`--compile` (torch.compile of the forward and loss; backward follows), and the fused SGD/AdamW kernel
wherever the installed torch has one for the device. On CUDA, TF32 is allowed for float32 matmuls and
convolutions, and cuDNN picks its algorithms by benchmark (`--deterministic` switches both to
reproducible choices).

Multi-GPU: `torchrun --nproc_per_node N SCRIPT.py ...` runs any script data-parallel. --batch-size is the
global batch, split over the ranks (shard_bounds); the trained modules and the loss go into
DistributedDataParallel (prepare_training), the frozen teacher does not; the loop's sums and the test
metrics are added up over the ranks; rank 0 alone claims the run folder, logs and writes.

Sections, in order: data; recipes (the RECIPES table); fast paths; the step and the loop; then, below the
banner: compiling the step, run folders and checkpoints, logging and signals, the command line, torchrun,
image folders, streamed image folders, teachers, `main`.
"""
import argparse
import atexit
import contextlib
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

from models import (DEFAULT_LR, IMAGENET_MODELS, MODEL_NAMES, TORCHVISION_MODELS, classifier, create_model,
                    default_image_size, fixed_image_size, model_family, state_dict_classes)


NORMALIZATION = {  # the benchmark's per-channel mean and std
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def log(message):
    """Print a line of the run (under torchrun, rank 0 speaks for all) and keep it in the run's log.txt."""
    if rank() == 0:
        print(message, flush=True)
        run_log.write(message)


class RunLog:
    """What a run prints, also appended to log.txt in its run folder (`folder`, once claimed), each line
    after its date and time. Lines printed before the folder is claimed (the data's) are kept and written
    first; a later run in the same folder (a resume) appends to it."""

    def __init__(self):
        self.file, self.pending, self.folder = None, [], None

    def start(self):
        """A new run in this process: forget the previous one's file, folder and lines."""
        if self.file:
            self.file.close()
        self.file, self.pending, self.folder = None, [], None

    def open(self, path):
        """Start writing to `path`, the log file of the run folder that this run claimed."""
        pending, self.folder = self.pending, Path(path).parent
        self.file, self.pending = open(path, "a", encoding="utf-8"), []
        self.file.write("".join(pending))
        self.file.flush()

    def write(self, message):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = "".join(f"{stamp} {line}\n" for line in str(message).splitlines() or [""])
        if self.file is None:
            self.pending.append(lines)
            return
        try:
            self.file.write(lines)
            self.file.flush()
        except OSError:  # a full disk stops the run where it writes its results, not here
            pass


run_log = RunLog()


# ----------------------------------------------------------------------------------------------------- data

class Data:
    """uint8 images (N, 3, S0, S0) and int64 labels for train and test, on one device. The models see
    image_size x image_size inputs: S0 itself (32 for the CIFAR zoo), or, where the images are kept smaller
    (CIFAR at 224), training batches upsampled by a random resized crop and test images by a resize.
    augment: "pad-crop" (4-pixel zero padding, crop, flip: the CIFAR benchmark's) or "resized-crop"
    (torchvision's RandomResizedCrop of area fraction in crop_scale and aspect ratio in crop_ratio, flip)."""

    def __init__(self, train_x, train_y, test_x, test_y, num_classes, mean, std, name, image_size=None,
                 augment=None, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3)):
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y
        self.num_classes, self.name = num_classes, name
        self.classes = None  # the class names, in label order, where the data has them (image folders)
        self.fingerprint = fingerprint(train_x, train_y, test_x, test_y)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.image_size = image_size or self.stored_size
        self.augment = augment or ("pad-crop" if self.image_size == self.stored_size else "resized-crop")
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)

    def to(self, device):
        for key in ("train_x", "train_y", "test_x", "test_y", "mean", "std"):
            setattr(self, key, getattr(self, key).to(device))
        return self

    @property
    def stored_size(self):
        return self.train_x.shape[-1]

    @property
    def device(self):
        return self.train_x.device

    def normalize(self, x):
        """uint8 pixels, or float ones in 0..255 (a resized batch, modified in place), normalised."""
        return (x.float().div_(255) - self.mean) / self.std


def fingerprint(*tensors):
    """16 hex digits of SHA-1 over the tensors' bytes: what a run and a teacher were trained on, by content
    (not by path: two folders of the same name hold different images). About 0.3 s for CIFAR-100."""
    digest = hashlib.sha1()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_cifar(name, data_dir):
    import torchvision  # only needed for the official CIFAR files

    cls = torchvision.datasets.CIFAR100 if name == "cifar100" else torchvision.datasets.CIFAR10
    splits = []
    for train in (True, False):
        try:
            ds = cls(data_dir, train=train, download=False)
        except RuntimeError:
            check_cifar_files(name, data_dir)
            try:
                ds = cls(data_dir, train=train, download=True)
            except Exception as error:
                fetch = f"torchvision.datasets.{cls.__name__}('{data_dir}', download=True)"
                fix = (f"On a machine with network run: python -c \"import torchvision; {fetch}\" and "
                       f"copy {data_dir}/ here, or pass --data-dir DIR where it is, or use --dataset "
                       "folder/synthetic.")
                raise SystemExit(f"error: {name} is not in {data_dir}/ and could not be downloaded "
                                 f"({type(error).__name__}). {fix}") from None
        splits += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)]
    return splits, len(ds.classes)


def check_cifar_files(name, data_dir):
    """Present CIFAR files that fail torchvision's md5 check (a damaged or partial download) are one line
    naming them; absent ones are left to the download."""
    from torchvision.datasets import cifar
    from torchvision.datasets.utils import check_integrity

    cls = cifar.CIFAR100 if name == "cifar100" else cifar.CIFAR10

    folder = Path(data_dir).expanduser() / cls.base_folder
    listed = cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
    files = [(folder / name, md5) for name, md5 in listed]
    present = [path for path, _ in files if path.exists()]
    damaged = [path.name for path, md5 in files if path.exists() and not check_integrity(str(path), md5)]
    if damaged or (present and len(present) < len(files)):
        missing = [path.name for path, _ in files if not path.exists()]
        parts = [f"damaged (fail torchvision's md5 check): {', '.join(damaged)}" if damaged else "",
                 f"missing: {', '.join(missing)}" if missing else ""]
        raise SystemExit(f"error: {folder}/ is incomplete or damaged ({'; '.join(p for p in parts if p)}): a "
                         f"partial or broken download. Delete {folder}/ and download it again, or pass "
                         "--data-dir DIR where a good copy is")


def make_synthetic(num_classes=10, train_size=10000, test_size=2000, seed=1234, image_size=32):
    """A learnable image task with no files: each class is a smooth random colour pattern; samples are
    that pattern shifted by up to 4 pixels, rescaled in contrast and covered in strong noise, at 32x32
    (then resized bilinearly to image_size, 1,000 images at a time)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=32, mode="bicubic",
                               align_corners=False)
    splits = []
    for n in (train_size, test_size):
        labels = torch.arange(n) % num_classes
        x = prototypes[labels]
        shifts = torch.randint(-4, 5, (n, 2, 1), generator=g)
        rows, cols = (torch.arange(32) - shifts[:, 0]) % 32, (torch.arange(32) - shifts[:, 1]) % 32
        x = x[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]  # a circular shift of each image
        contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
        x = 0.5 + (x - 0.5) * contrast + 0.35 * torch.randn(x.shape, generator=g)
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        if image_size != 32:
            images = torch.cat([resize_uint8(chunk, image_size) for chunk in images.split(1000)])
        splits += [images, labels]
    return splits, num_classes


def resize_uint8(images, size):
    """(N, 3, H, W) uint8 images resized bilinearly to size x size, uint8."""
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def balanced_subset(labels, size, num_classes, seed):
    """Indices of `size` samples, size // num_classes from every class, chosen with a fixed seed."""
    per_class = size // num_classes
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < per_class:
            raise SystemExit(f"error: --train-subset {size} needs {per_class} images of class {c}, it has "
                             f"{len(idx)}")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks).sort().values


def image_size_of(args):
    """The run's input side: --image-size, or else the models' own (32 for the CIFAR zoo); one line if the
    models of a pair are built for different sizes."""
    names = [name for name in (getattr(args, key, None) for key in ("model", "teacher", "student")) if name]
    if getattr(args, "image_size", None):
        for name in names:
            if fixed_image_size(name) not in (None, args.image_size):
                raise SystemExit(f"error: {name} takes {fixed_image_size(name)}x{fixed_image_size(name)} "
                                 f"inputs only, not --image-size {args.image_size}")
        return args.image_size
    sizes = {name: default_image_size(name) for name in names}
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise SystemExit(f"error: the models are built for different input sizes ({shown}); pass "
                         f"--image-size")
    return next(iter(sizes.values()), 32)


def load_data(args, device):
    """The dataset of --dataset for the run's image size (image_size_of), as a Data on `device`: kept at
    --store-size (CIFAR: 32; folder and synthetic: the image size, unless given)."""
    size = image_size_of(args)
    stored = getattr(args, "store_size", None) or (32 if args.dataset in ("cifar100", "cifar10") else size)
    for flag in ("crop_scale", "crop_ratio"):
        low, high = getattr(args, flag, (0, 0))
        if low > high:
            raise SystemExit(f"error: --{flag.replace('_', '-')} {low:g} {high:g}: MIN is above MAX")
    if stored > size:
        raise SystemExit(f"error: --store-size {stored} is larger than the image size {size}; images are "
                         "kept at most at the size the models see")
    if getattr(args, "pipeline", "auto") == "stream" and args.dataset not in ("imagenet", "folder"):
        raise SystemExit(f"error: --pipeline stream reads an image folder's files (--dataset folder or "
                         f"imagenet); {args.dataset} is always kept on the device: drop it")
    listing = None  # an image folder is listed once, for the choice of pipeline and for reading it
    if args.dataset in ("imagenet", "folder"):
        listing = list_image_folder(args.data_dir, ("train", "val") if args.dataset == "imagenet" else None)
    streamed = bool(listing) and streams(args, stored, listing)
    unused = [flag for flag, used in (("--augment pad-crop", getattr(args, "augment", None) != "pad-crop"),
                                      ("--store-size", not getattr(args, "store_size", None))) if not used]
    unused = unused if streamed else (["--eval-resize"] if getattr(args, "eval_resize", None) else [])
    if unused:  # flags a pipeline has no use for would be recorded as if they had changed the training
        pipeline = "streamed pipeline (resized crops of the files)" if streamed else "device pipeline"
        raise SystemExit(f"error: {' and '.join(unused)} has no effect in the {pipeline} of this run; drop "
                         "it")
    if streamed:
        data = load_streamed_folder(args, size, device, listing)
        data.classes = listing[0]
        if args.train_subset:
            check_subset(args, data.train_y.cpu(), data.num_classes)
            data.subset(balanced_subset(data.train_y.cpu(), args.train_subset, data.num_classes, seed=0))
        return data
    if args.dataset in ("cifar100", "cifar10"):
        if stored != 32:
            raise SystemExit(f"error: --dataset {args.dataset} is kept at its own 32x32 (upsampled to "
                             f"--image-size {size} batch by batch); drop --store-size {stored}")
        (train_x, train_y, test_x, test_y), num_classes = load_cifar(args.dataset, args.data_dir)
        mean, std = NORMALIZATION[args.dataset]
    else:
        if listing:
            (train_x, train_y, test_x, test_y), num_classes = load_image_folder(args.data_dir, stored,
                                                                                listing=listing)
        else:
            (train_x, train_y, test_x, test_y), num_classes = make_synthetic(image_size=stored)
    if args.train_subset:
        check_subset(args, train_y, num_classes)
        keep = balanced_subset(train_y, args.train_subset, num_classes, seed=0)
        train_x, train_y = train_x[keep], train_y[keep]
    if args.dataset in ("imagenet", "folder", "synthetic"):  # statistics of the images actually trained on
        pixels = train_x.float().div(255)
        mean, std = pixels.mean((0, 2, 3)).tolist(), pixels.std((0, 2, 3)).tolist()
    if getattr(args, "augment", None) == "pad-crop" and stored != size:
        raise SystemExit(f"error: --augment pad-crop crops at the size the images are kept at ({stored}), "
                         f"not at --image-size {size}; use --augment resized-crop, or keep them at {size}")
    augment = dict(augment=getattr(args, "augment", None), crop_scale=getattr(args, "crop_scale", (0.08, 1)),
                   crop_ratio=getattr(args, "crop_ratio", (3 / 4, 4 / 3)))
    data = Data(train_x, train_y, test_x, test_y, num_classes, mean, std, args.dataset, size, **augment)
    data.classes = listing[0] if listing else None
    return data.to(device)


def streams(args, stored, listing):
    """Whether a folder is streamed from its files rather than kept on the device: --pipeline stream; or
    auto and ImageNet (whose evaluation protocol, a resize and a center crop, is the stream's) or a folder
    whose images decoded at stored x stored would take more than --device-data-limit GB."""
    pipeline = getattr(args, "pipeline", "auto")
    if pipeline != "auto":
        return pipeline == "stream"
    if args.dataset == "imagenet":
        return True
    decoded = sum(len(paths) for paths, _ in listing[1].values()) * 3 * stored * stored
    return decoded > getattr(args, "device_data_limit", 8.0) * 1e9


def check_subset(args, train_y, num_classes):
    """--train-subset N: at most the training images, at least one per class, a multiple of the classes."""
    if args.train_subset > len(train_y):
        raise SystemExit(f"error: --train-subset {args.train_subset} is more than the {len(train_y)} "
                         f"training images of {args.dataset}")
    if args.train_subset < num_classes:
        raise SystemExit(f"error: --train-subset {args.train_subset} is fewer than the {num_classes} "
                         f"classes of {args.dataset}: a class-balanced subset needs one image per class "
                         "at least")
    if args.train_subset % num_classes:
        lower = args.train_subset // num_classes * num_classes
        raise SystemExit(f"error: --train-subset {args.train_subset} does not split evenly over the "
                         f"{num_classes} classes of {args.dataset}: use a multiple of {num_classes}, "
                         f"e.g. {lower} or {lower + num_classes}")


def train_batches(data, batch_size, seed, epoch, channels_last=False, shard=(0, 1)):
    """Shuffled, augmented, normalised batches: random crop after 4-pixel zero padding and horizontal flip,
    or a random resized crop and flip (data.augment). The randomness of an epoch depends only on (seed,
    epoch). Under torchrun, `shard` is (rank, world size): every rank draws the same epoch and takes its part
    of each global batch of `batch_size` (see shard_bounds), so that the ranks' parts together are exactly
    the single-process epoch."""
    if isinstance(data, StreamedData):
        yield from data.train_batches(batch_size, seed, epoch, channels_last, shard)
        return
    n, size = len(data.train_y), data.image_size
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).to(data.device)
    if data.augment == "resized-crop":
        boxes = resized_crop_boxes(n, data.stored_size, data.stored_size, data.crop_scale, data.crop_ratio, g)
        boxes, flips = boxes.to(data.device), (torch.rand(n, generator=g) < 0.5).to(data.device)
        for start in range(0, n, batch_size):
            lo, hi = shard_bounds(start, min(start + batch_size, n), *shard)
            idx = order[lo:hi]
            x = data.normalize(data.train_x[idx])  # on the small images: see resized_crops
            x = resized_crops(x, boxes[lo:hi], size, flips[lo:hi], channels_last)
            yield x, data.train_y[idx]
        return
    offsets = torch.randint(0, 9, (n, 2), generator=g).to(data.device)
    flips = (torch.rand(n, generator=g) < 0.5).to(data.device)
    arange = torch.arange(size, device=data.device)
    for start in range(0, n, batch_size):
        lo, hi = shard_bounds(start, min(start + batch_size, n), *shard)
        idx = order[lo:hi]
        x = F.pad(data.train_x[idx], (4, 4, 4, 4))  # zero pixels, like the benchmark's padded PIL crop
        rows = (offsets[lo:hi, 0, None] + arange)[:, None, :, None]
        cols = (offsets[lo:hi, 1, None] + arange)[:, None, None, :]
        x = x[torch.arange(len(idx), device=x.device)[:, None, None, None],
              torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
        x = torch.where(flips[lo:hi, None, None, None], x.flip(3), x)
        x = data.normalize(x)
        yield (x.contiguous(memory_format=torch.channels_last) if channels_last else x), data.train_y[idx]


def test_batches(data, batch_size=500, channels_last=False, shard=(0, 1)):
    """The test set in order, in global batches of `batch_size`, each rank its part of each (see
    shard_bounds). Under torchrun a last batch smaller than the world size joins the one before it, so that
    no rank's part is empty (a single process is unaffected)."""
    if isinstance(data, StreamedData):
        yield from data.test_batches(batch_size, channels_last, shard)
        return
    for lo, hi in test_batch_bounds(len(data.test_y), batch_size, shard):
        x = data.test_x[lo:hi]
        if data.stored_size != data.image_size:  # kept smaller (CIFAR at 224): the whole image, resized
            x = F.interpolate(x.float(), size=data.image_size, mode="bilinear", align_corners=False)
        x = data.normalize(x)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        yield x, data.test_y[lo:hi]


def test_batch_bounds(n, batch_size, shard):
    """This rank's part [lo, hi) of each global test batch (see test_batches)."""
    starts = list(range(0, n, batch_size))
    if shard[1] > 1 and len(starts) > 1 and n - starts[-1] < shard[1]:
        starts.pop()
    return [shard_bounds(start, stop, *shard) for start, stop in zip(starts, starts[1:] + [n])]


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


def shard_bounds(start, stop, rank, world):
    """This rank's contiguous part [lo, hi) of the global batch [start, stop): the world's parts differ in
    size by at most one and together are the batch ([start, stop) itself in a single process)."""
    size, extra = divmod(stop - start, world)
    lo = start + rank * size + min(rank, extra)
    return lo, lo + size + (rank < extra)


# -------------------------------------------------------------------------------------------------- recipes

# The training recipe of each setting (--recipe) and model family; every entry is also a flag.
# cifar: the CIFAR benchmark's recipes. cnn: SGD, x0.1 at 62.5/75/87.5 % of the epochs (150/180/210 of 240),
#   with the benchmark's per-model lr where it differs (models.DEFAULT_LR: MobileNetV2/ShuffleV1/ShuffleV2
#   0.01). token (ViT/Mixer) [choice]: AdamW, cosine after a linear warm-up of min(5, epochs // 10) epochs
#   (None here), label smoothing 0.1.
# imagenet: cnn is the KD benchmarks' ImageNet recipe (mdistiller configs/imagenet/r34_r18: SGD lr 0.2 for
#   batch 512, weight decay 1e-4, 100 epochs, x0.1 at 30/60/90); token [choice] is DeiT's optimiser and
#   schedule (AdamW lr 5e-4 for batch 512, weight decay 0.05, 300 epochs, cosine after 5 warm-up epochs,
#   label smoothing 0.1) without its augmentations (RandAugment, mixup, CutMix, random erasing, repeated
#   augmentation) and without EMA.
# ofa: OFA-KD's 224-px CIFAR-100 recipes (LFCC's protocol), batch 128, 300 epochs, cosine. cnn: SGD lr 0.05,
#   weight decay 2e-3; token: AdamW lr 5e-4, weight decay 0.05, 20 warm-up epochs, label smoothing 0.1
#   [choice]; OFA-KD's own augmentations for ViT students (timm's) are left out as for imagenet.
RECIPES = {
    "cifar": {
        "cnn": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64, epochs=240,
                    schedule="step", milestone_fractions=(0.625, 0.75, 0.875), lr_decay=0.1, warmup_epochs=0,
                    label_smoothing=0.0),
        "token": dict(optimizer="adamw", lr=1e-3, momentum=0.9, weight_decay=0.05, batch_size=128, epochs=240,
                      schedule="cosine", milestone_fractions=(0.625, 0.75, 0.875), lr_decay=0.1,
                      warmup_epochs=None, label_smoothing=0.1),
    },
    "imagenet": {
        "cnn": dict(optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=1e-4, batch_size=512, epochs=100,
                    schedule="step", milestone_fractions=(0.3, 0.6, 0.9), lr_decay=0.1, warmup_epochs=0,
                    label_smoothing=0.0),
        "token": dict(optimizer="adamw", lr=5e-4, momentum=0.9, weight_decay=0.05, batch_size=512, epochs=300,
                      schedule="cosine", milestone_fractions=(0.3, 0.6, 0.9), lr_decay=0.1, warmup_epochs=5,
                      label_smoothing=0.1),
    },
    "ofa": {
        "cnn": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=2e-3, batch_size=128, epochs=300,
                    schedule="cosine", milestone_fractions=(0.625, 0.75, 0.875), lr_decay=0.1,
                    warmup_epochs=0, label_smoothing=0.0),
        "token": dict(optimizer="adamw", lr=5e-4, momentum=0.9, weight_decay=0.05, batch_size=128, epochs=300,
                      schedule="cosine", milestone_fractions=(0.625, 0.75, 0.875), lr_decay=0.1,
                      warmup_epochs=20, label_smoothing=0.1),
    },
}


def recipe_setting(args):
    """--recipe, else by the data: imagenet for --dataset imagenet, ofa for CIFAR at another size than 32
    (the 224-px protocol), cifar otherwise."""
    if getattr(args, "recipe", None):
        return args.recipe
    dataset = getattr(args, "dataset", None)
    if dataset == "imagenet":
        return "imagenet"
    cifar = dataset in ("cifar100", "cifar10")
    return "ofa" if cifar and getattr(args, "image_size", None) not in (None, 32) else "cifar"


def run_epochs(args, family=None):
    """--epochs, else the recipe's for `family` (default: the student's or --model's)."""
    if getattr(args, "epochs", None):
        return args.epochs
    name = getattr(args, "student", None) or getattr(args, "model", None)
    return RECIPES[recipe_setting(args)][family or (model_family(name) if name else "cnn")]["epochs"]


def make_recipe(args, family, epochs=None, use_overrides=True, model_name=None):
    """RECIPES[setting][family] for `epochs` (default --epochs, else the recipe's), with `model_name`'s lr
    from models.DEFAULT_LR (the cifar setting), and the recipe flags given on the command line on top
    (unless use_overrides is False).

    The milestones and a row's warm-up scale with the epochs. Milestones are rounded and distinct: a
    milestone that rounds onto another is dropped, so no epoch decays twice (5 epochs give [3, 4], not
    [3, 4, 4], which ran the last epoch at lr x 0.001), and one that rounds to 0 too, so that the peak lr is
    used (1 epoch of the imagenet row gives [1], not [0, 1])."""
    setting = recipe_setting(args)
    recipe = dict(RECIPES[setting][family])
    fractions, row_epochs = recipe.pop("milestone_fractions"), recipe["epochs"]
    recipe.update(epochs=epochs or run_epochs(args, family), milestones=None, grad_clip=0.0)
    if recipe["warmup_epochs"]:  # a row's warm-up is for its epochs: a shorter run warms up in proportion
        recipe["warmup_epochs"] *= recipe["epochs"] / row_epochs
    if setting == "cifar":
        recipe["lr"] = DEFAULT_LR.get(model_name, recipe["lr"])
    if use_overrides:
        given = {k: getattr(args, k) for k in recipe if k != "epochs" and getattr(args, k, None) is not None}
        recipe.update(given)
    if recipe["warmup_epochs"] is None:
        recipe["warmup_epochs"] = min(5, recipe["epochs"] // 10)
    if recipe["milestones"] is None:  # distinct: in a short run two fractions can round to one epoch
        recipe["milestones"] = sorted({round(recipe["epochs"] * f) for f in fractions} - {0})
    return recipe


def learning_rate(recipe, progress):
    """Learning rate at `progress` epochs (a float: epoch + fraction of the epoch done)."""
    base = recipe["lr"]
    if progress < recipe["warmup_epochs"]:
        return base * (progress + 1e-3) / recipe["warmup_epochs"]
    if recipe["schedule"] == "cosine":
        t = (progress - recipe["warmup_epochs"]) / max(1e-8, recipe["epochs"] - recipe["warmup_epochs"])
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return base * recipe["lr_decay"] ** sum(progress >= m for m in recipe["milestones"])


def make_optimizer(recipe, params, fused=False):
    """SGD or AdamW from the recipe; `fused` selects the single-kernel implementation (the same update up to
    float rounding)."""
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=recipe["lr"], momentum=recipe["momentum"],
                               weight_decay=recipe["weight_decay"], fused=fused)
    return torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"], fused=fused)


# ----------------------------------------------------------------------------------------------- fast paths

def fused_optimizer_available(device):
    """Whether the installed torch has fused SGD/AdamW kernels for this device type."""
    try:
        torch.optim.SGD([torch.zeros(1, device=device, requires_grad=True)], lr=0.1, fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


def fast_paths(args, device):
    """The speed settings of a run, decided here and nowhere else.

    amp: bf16 autocast of forward and loss (`--amp`; default bf16 on CUDA, off on CPU). Losses that need
        float32 compute in float32 inside it (KD terms, InfoNCE, feature MSE).
    channels_last: NHWC memory format for images, models and connectors (`--[no-]channels-last`; default on:
        faster convolutions with cuDNN, and on CPU measured 1.17-1.22x the images/s of every method with a CNN
        student, see benchmarks/README.md).
    compile: None, or the torch.compile mode of the forward and loss (`--compile [MODE]`): "default" fuses
        kernels; "reduce-overhead" also replays each step as a CUDA graph, for steps bound by kernel launches.
    fused: the single-kernel SGD/AdamW update wherever torch has one for the device (not a flag; on CPU it
        changes results only at float-rounding level and saves under 1 % of a step).
    sync_bn: under torchrun, the trained modules' BatchNorm statistics computed over all ranks' images
        (`--sync-bn`, CUDA only); off: each rank's BatchNorms see its own part of the batch."""
    cuda = device.type == "cuda"
    amp, channels_last = getattr(args, "amp", None), getattr(args, "channels_last", None)
    return argparse.Namespace(
        amp=(amp or ("bf16" if cuda else "off")) == "bf16",
        channels_last=True if channels_last is None else channels_last,
        compile=getattr(args, "compile", None),
        fused=fused_optimizer_available(device),
        sync_bn=bool(getattr(args, "sync_bn", False)))


def describe(fast):
    sync_bn = ", synchronised BatchNorm" if getattr(fast, "sync_bn", False) else ""
    return (f"amp {'bf16' if fast.amp else 'off'}, channels_last {'on' if fast.channels_last else 'off'}, "
            f"compile {fast.compile or 'off'}, fused optimizer {'on' if fast.fused else 'off'}{sync_bn}")


# --------------------------------------------------------------------------- the training step and the loop

def make_train_step(loss_fn, optimizer, params, recipe, fast, device):
    """step(x, y, progress, lr, loss_scale=1) -> (loss, {name: term}), all detached: forward and loss under
    autocast (compiled with fast.compile), backward, gradient clipping, optimizer step at learning rate `lr`.
    loss_scale weighs a rank's part of a batch by its size when the parts differ (see fit)."""
    def forward(x, y, progress):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast.amp):
            return loss_fn(x, y, progress)
    if fast.compile:
        forward = compile_forward(forward, fast.compile, device)

    def step(x, y, progress, lr, loss_scale=1.0):
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, terms = forward(x, y, progress)
        optimizer.zero_grad(set_to_none=True)
        (loss * loss_scale if loss_scale != 1.0 else loss).backward()  # under torchrun: gradients averaged
        if recipe["grad_clip"]:
            nn.utils.clip_grad_norm_(params, recipe["grad_clip"])
        optimizer.step()
        return loss.detach(), {name: value.detach() for name, value in terms.items()}
    return step


def prepare_training(model, train_modules, loss_fn, recipe, fast, device):
    """What precedes the first step, in fit and in the throughput benchmark: model and train modules in the
    fast paths' memory format, the optimizer over the trainable parameters of `train_modules` (each once),
    and the train step. Under torchrun the train modules and the loss go into DistributedDataParallel
    (TrainedModules); a frozen teacher, not among them, is never wrapped. Returns (optimizer, step)."""
    if fast.channels_last:
        for module in [model] + train_modules:
            module.to(memory_format=torch.channels_last)
    params = [p for m in train_modules for p in m.parameters() if p.requires_grad]
    params = list({id(p): p for p in params}.values())
    optimizer = make_optimizer(recipe, params, fast.fused)
    if world_size() > 1:
        loss_fn = distributed_loss(train_modules, loss_fn, device, fast.sync_bn)
    return optimizer, make_train_step(loss_fn, optimizer, params, recipe, fast, device)


def build_model(name, num_classes, device, sync_bn=False):
    """A fresh model on `device` (fit puts it in channels_last where the fast paths say so); with sync_bn,
    under torchrun, its BatchNorms synchronised across ranks (for a model that trains, never a teacher)."""
    model = create_model(name, num_classes).to(device)
    if sync_bn and world_size() > 1:
        synchronise_batchnorm(model)
    return model


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def classification_loss(model, label_smoothing):
    """fit's default loss_fn: cross-entropy of the model's logits, no logged terms."""
    def loss_fn(x, y, progress):
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing), {}
    return loss_fn


def accuracies(logits, y):
    """Top-1 accuracy in % ('test_acc') and, with more than 10 classes, top-5 ('test_top5'): batch means."""
    metrics = {"test_acc": 100.0 * (logits.argmax(1) == y).float().mean()}
    if logits.shape[1] > 10:
        metrics["test_top5"] = 100.0 * (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean()
    return metrics


def default_eval(model):
    def evaluate(x, y):
        return accuracies(model(x), y)
    return evaluate


def fit(model, data, out_dir, recipe, *, seed, loss_fn=None, train_modules=None, eval_fn=None, fast=None,
        resume=False, eval_every=1, log_every=30.0, title="", summary_fields=None, config=None, teacher=None):
    """Train and evaluate `model` on `data` with `recipe` (see make_recipe) into `out_dir`; return the
    summary.

    model: the network that is evaluated and saved as `model.pth` (the student).
    seed: the seed of the batches' order and augmentation (the caller seeds the initialisation).
    loss_fn(x, y, progress) -> (loss, {name: scalar tensor}): the training objective; `progress` is the
        float epoch (a 0-dim tensor under --compile: use it in arithmetic and min/max only). The named
        terms are averaged over the epoch and logged. Default: cross-entropy.
    train_modules: the modules put in train mode each epoch and whose trainable parameters are optimised
        (default [model]); everything else stays in eval mode, a teacher or frozen stages for example.
        Their state goes into the resumable checkpoint (connectors, projectors), not into `model.pth`.
    eval_fn(x, y) -> {name: batch-mean tensor}: test metrics, averaged over the test set; 'test_acc' (in %)
        is tracked for best/last accuracy when present. Default: the model's accuracy.
    fast: the speed settings of `fast_paths` (default: the device's defaults); resume: continue from
        out_dir/checkpoint.pt if there is one; eval_every, log_every: as the flags of those names.
    summary_fields: extra entries of summary.json (a method's own record); config: the run's flags, for it
        and for the checkpoint's identity; teacher: the frozen teacher's record (teacher_record), likewise.
    title: what this fit trains (a teacher, an SSKD phase, ...), in the log and in the checkpoint's identity.
    """
    device = data.device
    train_modules = train_modules or [model]
    eval_fn = eval_fn or default_eval(model)
    loss_fn = loss_fn or classification_loss(model, recipe["label_smoothing"])
    fast = fast or fast_paths(None, device)
    optimizer, train_step = prepare_training(model, train_modules, loss_fn, recipe, fast, device)
    folder = RunFolder(out_dir, run_identity(model, data, recipe, seed, config, teacher, title),
                       (config or {}).get("accepted_data"))
    history = folder.start(model, train_modules, optimizer, resume, device)  # the epochs already trained
    if history and history[-1].pop("evaluated", True) is False:  # its evaluation was stopped: done now
        history[-1].update(evaluate(data, eval_fn, model, train_modules, fast))
        folder.save_epoch(model, train_modules, optimizer, history, recipe["epochs"], new_epoch=False)
    n_train = len(data.train_y)
    steps_per_epoch = math.ceil(n_train / recipe["batch_size"])
    shard = (rank(), world_size())  # under torchrun each rank trains on its part of every global batch
    log_start(title or model.arch, recipe, steps_per_epoch, model, train_modules, device, fast)

    for epoch in range(len(history), recipe["epochs"]):
        model.eval()  # what is not trained (a teacher, frozen stages) stays in eval mode
        for module in train_modules:
            module.train()
        progress_line = ProgressLine(epoch, recipe, steps_per_epoch, log_every, folder.checkpoint)
        loss_sum, term_sums, seen = torch.zeros((), device=device), {}, 0
        batches = train_batches(data, recipe["batch_size"], seed, epoch, fast.channels_last, shard)
        for step, (x, y) in enumerate(batches):
            progress = epoch + step / steps_per_epoch
            lr = learning_rate(recipe, progress)
            batch = min(recipe["batch_size"], n_train - step * recipe["batch_size"])
            loss, terms = train_step(x, y, progress, lr, loss_scale=len(y) * shard[1] / batch)
            loss_sum += loss.float() * len(y)  # the sums stay on the device: no host sync per step
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0) + value.float() * len(y)
            seen += len(y)
            progress_line.maybe_log(step, loss_sum, seen, min((step + 1) * recipe["batch_size"], n_train))
        images = torch.tensor(float(seen), device=device)
        sums = sum_across_ranks({"train_loss": loss_sum, **term_sums, "images": images})  # over the epoch
        seen, loss_sum = sums.pop("images").item(), sums.pop("train_loss")
        check_finite(loss_sum, epoch, folder.checkpoint, recipe)
        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / seen, "lr": lr,
               "images_per_sec": seen / (time.time() - progress_line.start)}
        row.update({name: value.item() / seen for name, value in sums.items()})
        if (epoch + 1) % eval_every == 0 or epoch + 1 == recipe["epochs"]:
            try:
                row.update(evaluate(data, eval_fn, model, train_modules, fast))
            except BaseException:  # an unreadable test image, Ctrl-C: the epoch's training is kept first
                row.update(seconds=time.time() - progress_line.start, evaluated=False)
                folder.save_epoch(model, train_modules, optimizer, history + [row], recipe["epochs"])
                raise
        row["seconds"] = time.time() - progress_line.start
        history.append(row)
        folder.save_epoch(model, train_modules, optimizer, history, recipe["epochs"])
        log_epoch(row, recipe["epochs"], history)

    records = {"config": config, "teacher": teacher}
    fields = {**(summary_fields or {}), **{k: v for k, v in records.items() if v is not None}}
    return folder.finish(model, data, recipe, history, fast, fields)


@torch.no_grad()
def evaluate(data, eval_fn, model, train_modules, fast):
    """eval_fn's metrics averaged over exactly the test set: each rank its part of every batch, the sums and
    the count added up over the ranks."""
    model.eval()
    for module in train_modules:
        module.eval()
    sums, n = {}, 0
    with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=fast.amp):
        for x, y in test_batches(data, channels_last=fast.channels_last, shard=(rank(), world_size())):
            for name, value in eval_fn(x, y).items():
                sums[name] = sums.get(name, 0) + value.float() * len(y)
            n += len(y)
    totals = sum_across_ranks({**sums, "images": torch.tensor(float(n), device=data.device)})
    n = totals.pop("images").item()
    return {name: value.item() / n for name, value in totals.items()}


# ==========================================================================================================
# Below: the bookkeeping around the loop. A reader of the methods can stop here. Compiling the step, run
# folders (what identifies a run, resume checks, locks, atomic writes), progress and stop lines (Ctrl-C,
# SIGTERM, NaN), the command line and its validators, torchrun (ranks, DDP), image folders, the teachers.
# ==========================================================================================================

# --------------------------------------------------------------------------------- compiling the step

def compile_forward(forward, mode, device):
    """torch.compile of the step's forward(x, y, progress) (--compile MODE); backward follows the graph.

    A Python float that changes from call to call is not safe to pass into torch.compile: after the second
    value it becomes symbolic and expressions such as min(1.0, progress / r) were frozen at that value
    (Block-KD's warm-up stuck at 0.6). So `progress` enters as a 0-dim device tensor, updated in place (no
    host-to-device copy). dynamic=False: one graph per batch size. Every train step shares this code, and
    dynamo keeps at most 8 graphs per code object (then runs eager, silently): SSKD's five fits with two
    batch sizes each would pass that. So start afresh."""
    torch.compiler.reset()
    compiled = torch.compile(forward, dynamic=False, mode=mode)
    progress_tensor = torch.zeros((), device=device)

    def compiled_forward(x, y, progress):
        torch.compiler.cudagraph_mark_step_begin()  # a new training step: earlier graph outputs are consumed
        return compiled(x, y, progress_tensor.fill_(progress))
    return compiled_forward


# ------------------------------------------------------------------------------ run folders and checkpoints

class RunFolder:
    """fit's files in its run folder: locked while it trains; resumed only from a checkpoint of the same
    training (`identity`, see run_identity); checkpoint.pt, then metrics.jsonl, after every epoch; model.pth
    and summary.json at the end. Every file goes through write_atomic."""

    def __init__(self, out_dir, identity, accepted_data=None):
        self.out_dir, self.identity = Path(out_dir), identity
        self.accepted_data = set(accepted_data or [identity["data"]])  # see claim_out_dir
        if rank() == 0:  # the only writer under torchrun
            ensure_writable(self.out_dir, "the run folder")
            lock_dir(self.out_dir, "the run folder")  # a teacher's run in checkpoints/ (a script's is locked)
        self.checkpoint, self.metrics = self.out_dir / "checkpoint.pt", self.out_dir / "metrics.jsonl"
        self.started = time.time()
        self.world_sizes = {}  # {world size: epochs trained at it}, over the resumes of the run

    def start(self, model, train_modules, optimizer, resume, device):
        """The history of the epochs already trained: the checkpoint's, loaded into the model, train modules
        and optimizer, with `resume` (after checking that it is of this training); [] otherwise."""
        history = []
        results = list(itertools.islice(run_results(self.out_dir), 4)) if resume else []
        if results and not self.checkpoint.exists():  # a finished run whose checkpoint was deleted
            raise SystemExit(f"error: cannot resume {self.out_dir}: it holds results "
                             f"({', '.join(map(str, results))}) but no checkpoint.pt to continue from; "
                             "nothing was changed. Train it afresh with --overwrite, or choose another "
                             "--out-dir")
        if resume and self.checkpoint.exists():
            state = load_checkpoint(self.checkpoint, device)
            saved = same_data(identity_entries(state.get("identity", {})), self.accepted_data, self.identity)
            found = differences(saved, identity_entries(self.identity), "the checkpoint")
            if found:
                raise SystemExit(f"error: {self.checkpoint} is from another training run "
                                 f"({'; '.join(found)}); nothing was changed. Delete its folder to train "
                                 "afresh, or choose another folder")
            model.load_state_dict(state["model"])
            for module, module_state in zip(train_modules, state["train_modules"]):
                module.load_state_dict(module_state)
            optimizer.load_state_dict(state["optimizer"])
            history = state["history"]
            self.world_sizes = state.get("world_sizes", {"not recorded": len(history)})
            epochs = self.identity["recipe"]["epochs"]
            last_checkpoint.update(path=self.checkpoint, epoch=len(history), epochs=epochs)
            finished = " (finished: no epoch left to train)" if len(history) == epochs else ""
            log(f"resumed {self.out_dir} at epoch {len(history)}/{epochs}{finished}")
            write_metrics(self.metrics, history)  # from the checkpoint's history: no epoch twice
        return history

    def save_epoch(self, model, train_modules, optimizer, history, epochs, new_epoch=True):
        if new_epoch:
            self.world_sizes[str(world_size())] = self.world_sizes.get(str(world_size()), 0) + 1
        state = {"model": model.state_dict(), "train_modules": [m.state_dict() for m in train_modules],
                 "optimizer": optimizer.state_dict(), "epoch": len(history), "history": history,
                 "identity": self.identity, "world_sizes": self.world_sizes}
        save_atomic(state, self.checkpoint)
        write_metrics(self.metrics, history)  # after the checkpoint, from which a resume rewrites it
        last_checkpoint.update(path=self.checkpoint, epoch=len(history), epochs=epochs)

    def finish(self, model, data, recipe, history, fast, fields):
        """model.pth (when the last epoch was evaluated) and summary.json; returns the summary."""
        last = history[-1] if history else {}
        if "test_acc" in last:
            final_model = model_file(model, recipe["epochs"], last["test_acc"], data)
            save_atomic(final_model, self.out_dir / "model.pth")
        evaluated = [h for h in history if "test_acc" in h]
        best = max(evaluated, key=lambda h: h["test_acc"]) if evaluated else {}  # the first of equals
        summary = {"last_acc": last.get("test_acc"), "best_acc": best.get("test_acc"),
                   "best_epoch": best.get("epoch"), "last_top5": last.get("test_top5"),
                   "epochs": recipe["epochs"], "params": count_params(model),
                   "seconds": sum(h["seconds"] for h in history),
                   "mean_images_per_sec": sum(h["images_per_sec"] for h in history) / max(1, len(history)),
                   "evaluated_epochs": [h["epoch"] for h in evaluated], "last_epoch": last, "recipe": recipe,
                   "fast_paths": vars(fast), "data": data.fingerprint, "threads": torch.get_num_threads(),
                   "world_size": world_size(), "world_sizes": self.world_sizes,
                   "backend": dist.get_backend() if world_size() > 1 else None,
                   **fields}
        save_json(summary, self.out_dir / "summary.json")
        took = format_seconds(time.time() - self.started)
        if evaluated:
            top5 = f", top-5 {last['test_top5']:.4g}" if "test_top5" in last else ""
            result = (f"last acc {summary['last_acc']:.4g}{top5}, best {summary['best_acc']:.4g} (epoch "
                      f"{summary['best_epoch']})")
        else:  # a fit whose eval_fn measures no accuracy (an SSKD stage phase): its own test metrics
            not_measured = ("epoch", "lr", "images_per_sec", "seconds")
            measured = {k: v for k, v in last.items() if k not in not_measured and not k.startswith("train")}
            result = "last " + ", ".join(f"{k} {v:.4g}" for k, v in measured.items())
        log(f"done in {took}: {result} -> {self.out_dir}")
        return summary


def run_identity(model, data, recipe, seed, config, teacher, title):
    """What one fit trains, as its checkpoint records it: the run's training flags (a method's included), the
    model, seed, data and recipe, the teacher's weights, and the part of the run (`title`). A checkpoint of
    anything else is not resumed."""
    return json.loads(json.dumps({
        "flags": training_flags(config or {}), "model": model.arch, "seed": seed, "data": data.fingerprint,
        "recipe": recipe, "teacher": teacher and {k: teacher[k] for k in ("arch", "weights")},
        "part": title or model.arch}, default=str))


def write_metrics(path, history):
    """metrics.jsonl, one JSON object per epoch, rewritten whole (atomically) after every epoch."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in history).encode())


last_checkpoint = {}  # path, epoch, epochs of the newest checkpoint this process wrote (for the Ctrl-C line)

def write_atomic(path, content):
    """Write `content` (bytes) to `path` through a temporary file and a rename, the one way a run writes
    its files: a run killed mid-write or a full disk never leaves a half-written file, the previous version
    stays intact until the new one is complete, and no temporary file is left. An OS error (no space left
    on the device, permission denied) is one line naming the file, the cause and where the run stands.
    Under torchrun only rank 0 writes."""
    if rank() != 0:
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    except OSError as error:
        raise SystemExit(f"error: cannot write {path} ({error.strerror or error}); "
                         f"{where_the_run_stands()}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def save_atomic(obj, path):
    """torch.save through write_atomic (serialised in memory first, so a full disk is an OSError)."""
    if rank() != 0:
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getbuffer())


def save_json(obj, path):
    write_atomic(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def load_checkpoint(path, device="cpu", mmap=False):
    """A resumable checkpoint.pt, loaded safely (weights_only), or one line saying the file is unreadable.
    mmap: map the tensors instead of reading them (for a look at the identity)."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as error:  # torch's own message would suggest weights_only=False: never show it
        raise SystemExit(f"error: {path} is unreadable ({type(error).__name__}: truncated, corrupt or not a "
                         f"checkpoint of this code); nothing was changed. Delete it to restart that run from "
                         f"scratch, or choose another --out-dir") from None


def load_weights(model, path):
    """Load a checkpoint (benchmark format, ours, or a bare state_dict) into `model`, strictly (read_weights);
    returns what the file holds."""
    state, checkpoint = read_weights(path, model.arch, classifier(model).out_features)
    model.load_state_dict(state, strict=True)
    return checkpoint


def read_weights(path, arch, num_classes):
    """The state_dict of a weights file (the benchmark format, ours, or a bare state_dict; DDP's 'module.'
    prefixes dropped) and what the file holds, checked to be `arch` with `num_classes` classes: the one
    loader of teachers, --pretrained files and --evaluate. Every other file is one line: a folder, none,
    unreadable or unsafe to unpickle (never torch's advice to load it unsafely), no state_dict, another
    architecture or class count (named where the keys tell it), or keys that differ (counted, with
    examples)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SystemExit(f"error: checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # Not torch's message: it names the exception's cause and suggests weights_only=False (unsafe).
        raise SystemExit(f"error: {path} is not a readable PyTorch checkpoint ({type(error).__name__}); it "
                         "must hold tensors only: a state_dict, or a dict with a 'model' entry") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise SystemExit(f"error: {path} holds no state_dict (expected a dict of tensors, or a dict with a "
                         "'model' entry)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in create_model(arch, num_classes).state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} == wanted:
        return state, checkpoint
    found_arch = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
    found_arch = found_arch or identify_architecture(state)
    if found_arch is not None and (found_arch, state_dict_classes(state)) != (arch, num_classes):
        raise SystemExit(f"error: {path} holds {found_arch} with {state_dict_classes(state)} classes, but "
                         f"{arch} with {num_classes} classes was asked for")
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    reshaped = sorted(k for k in set(wanted) & set(state) if tuple(state[k].shape) != wanted[k])
    found = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
             ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if keys]
    raise SystemExit(f"error: {path} is not a state_dict of {arch} with {num_classes} classes: its keys "
                     f"differ, {', '.join(found)}")


def identify_architecture(state_dict):
    """The zoo name whose state_dict keys and shapes match, or None. Builds models on the meta device."""
    num_classes = state_dict_classes(state_dict) or 100
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for name in MODEL_NAMES:
        with torch.device("meta"):
            reference = create_model(name, num_classes).state_dict()
        if {k: tuple(v.shape) for k, v in reference.items()} == shapes:
            return name
    return None


def model_file(model, epoch, accuracy, data):
    """The benchmark's checkpoint format, plus the architecture name, class count and the fingerprint of the
    data it was trained on, for safer loading."""
    return {"model": model.state_dict(), "epoch": epoch, "accuracy": accuracy, "arch": model.arch,
            "num_classes": classifier(model).out_features, "data": data.fingerprint}


# ------------------------------------------------------------------------------------ claiming a run folder

# Flags that do not change what a run learns. They may differ when a run is resumed (a moved data folder,
# another device) and are left out of default run-folder names. --amp and the other speed flags change
# float rounding only.
RUN_ONLY_FLAGS = {"out_dir", "resume", "overwrite", "data_dir", "workers", "checkpoint_dir", "log_every",
                  "eval_every", "device", "amp", "channels_last", "compile", "deterministic", "teacher_ckpt",
                  "save_as_teacher", "allow_data_change", "accepted_data", "evaluate"}


NAMED_FLAGS = {"model", "teacher", "student", "dataset", "image_size", "train_subset", "seed"}  # in the name

RUN_FILE = "run.json"

RUN_LOG = "log.txt"  # what the run printed, each line with its time

RUN_TEACHER = "teacher.pth"  # the run's own copy of its teacher's file (keep_teacher_copy)

RUN_OUTPUTS = ("checkpoint.pt", "metrics.jsonl", "summary.json", "model.pth")  # what fit writes in a folder

_locked_dirs = {}  # resolved path -> its FileLock, held until the process exits

def training_flags(config):
    """The entries of a run's flags (vars(args)) that define what it learns, as JSON values."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in RUN_ONLY_FLAGS}, default=str))


def training_config(args, data):
    """What run.json records of a run: its training flags and its data's fingerprint."""
    return {**training_flags(vars(args)), "data": data.fingerprint}


def flag_value(value):
    return "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def dataset_tag(args, data):
    """Names the data of a run, in default run folders and teachers' places under checkpoints/: the dataset
    (cifar100, cifar10 and synthetic are fixed), for a folder its name and the first 8 digits of the content
    fingerprint (two folders called images/ are told apart), the image size where it is not 32 and the
    subset."""
    tag = args.dataset
    if args.dataset == "folder":
        tag = f"folder-{Path(args.data_dir).expanduser().resolve().name}-{data.fingerprint[:8]}"
    elif args.dataset == "imagenet":
        tag = f"imagenet-{data.fingerprint[:8]}"
    size = getattr(data, "image_size", 32)
    tag += f"-{size}px" if size != 32 else ""
    return tag + (f"-subset{args.train_subset}" if args.train_subset else "")


def default_out_dir(args, parser, run_name, data):
    """runs/<name>_<data>_seed<S>, then every training flag that differs from its default, e.g.
    runs/blockwise_kd_resnet32x4_resnet8x4_cifar100_seed0_alpha0.1_beta0.9_gamma0.0_stones-none, so that two
    commands that train differently never share a folder (a hash replaces a list longer than 80
    characters)."""
    changed = []
    for key, value in sorted(vars(args).items()):
        if key in RUN_ONLY_FLAGS | NAMED_FLAGS or value == parser.get_default(key):
            continue
        if isinstance(value, bool):
            changed.append(key.replace("_", "-") if value else "no-" + key.replace("_", "-"))
        else:
            name, dash = key.replace("_", "-"), "-" if isinstance(value, str) else ""
            changed.append(f"{name}{dash}{flag_value(value)}")
    suffix = "_".join(changed)
    if len(suffix) > 80:
        suffix = "flags-" + hashlib.sha1(suffix.encode()).hexdigest()[:10]
    name = f"{run_name}_{dataset_tag(args, data)}_seed{args.seed}" + (f"_{suffix}" if suffix else "")
    return str(Path("runs") / name)


class FileLock:
    """An OS lock (flock) on a file: held until release() or the process exits (on any exit, kill -9
    included)."""

    def __init__(self, path):
        self.path, self.handle = Path(path), None

    def acquire(self, wait=False):
        """Whether this process holds the lock now; with wait, once another process releases it."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here
            return True
        self.handle = open(self.path, "a")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            self.release()
            return False
        return True

    def release(self):
        if self.handle:
            self.handle.close()
            self.handle = None


def lock_dir(path, what):
    """Hold an OS lock on path/.lock until this process exits; one line and exit 1 if another process holds
    it. Folders inside one this process holds are not locked again."""
    path = Path(path).resolve()
    if any(locked == path or locked in path.parents for locked in _locked_dirs):
        return
    lock = FileLock(path / ".lock")
    if not lock.acquire():
        raise SystemExit(f"error: another process is using {what} {path} (it holds {path / '.lock'}); wait "
                         f"for it to finish, or choose another folder")
    _locked_dirs[path] = lock


def ensure_writable(path, what):
    """Create `path` and write a file in it, or one line naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"error: cannot write to {what} {path} ({type(error).__name__}: "
                         f"{error.strerror or error}); nothing was run") from None


def flag_entries(config):
    """A run's training flags as {'--name': value}, its data fingerprint under its own name (for messages)."""
    return {("the data (content fingerprint)" if k == "data" else "--" + k.replace("_", "-")): v
            for k, v in config.items()}


def identity_entries(identity):
    """A checkpoint's identity (see run_identity) as {name in messages: value}."""
    entries = flag_entries({**identity.get("flags", {}), "data": identity.get("data")})
    entries.update({f"the recipe's {k}": v for k, v in (identity.get("recipe") or {}).items()})
    entries.update({f"the teacher's {k}": v for k, v in (identity.get("teacher") or {}).items()})
    entries.update({"the model": identity.get("model"), "the seed": identity.get("seed"),
                    "the part of the run": identity.get("part")})
    return entries


def differences(saved, current, whose, names=None):
    """'--epochs 3 (the run has 2)' for every entry (see flag_entries) of `names` (default: all) whose value
    differs; an entry that `saved` lacks (a flag newer than the run) differs from any value."""
    found = []
    for name in sorted(names or set(saved) | set(current)):
        if name not in saved:
            found.append(f"{name} {flag_value(current.get(name))} ({whose} has no record of it)")
        elif saved[name] != current.get(name):
            found.append(f"{name} {flag_value(current.get(name))} ({whose} has {flag_value(saved[name])})")
    return found


def read_run_file(out_dir):
    """run.json of a run folder, or None if there is none; a damaged one is one line naming it."""
    path = Path(out_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        valid = isinstance(record, dict) and isinstance(record.get("config"), dict) and "script" in record
    except (OSError, ValueError):  # a directory, unreadable, not UTF-8, not JSON
        valid = False
    if not valid:
        what = ("damaged or from an older version of this code (it must be a JSON object with 'script' and "
                "'config')")
        raise SystemExit(f"error: {path} is {what}, so which run {out_dir} holds cannot be checked; nothing "
                         "was changed. Start afresh with --overwrite, or choose another --out-dir")
    return record


DATA_ENTRY = "the data (content fingerprint)"  # its name among a run's entries (flag_entries)


def check_resume(out_dir, script, config, data_record=None, allow_data_change=False):
    """--resume continues only the run the folder holds: run.json and every checkpoint in the folder (an SSKD
    phase's too) must record this script, these training flags and this data; each difference is named.
    The data may differ with allow_data_change, within the bounds of data_change (files deleted or
    replaced). Returns (the folder's run.json record or None, the data fingerprints taken as this data)."""
    record = read_run_file(out_dir)
    refuse = ("; nothing was changed. Resume with the run's flags, start afresh with --overwrite, or choose "
              "another --out-dir")
    accepted = {config["data"]}  # this data, and what it was before changes the run accepted
    if record is not None:
        if record["script"] != script:
            raise SystemExit(f"error: cannot resume {out_dir}: it holds a run of {record['script']}.py, not "
                             f"of {script}.py; nothing was changed. Resume it with {record['script']}.py, or "
                             "choose another --out-dir")
        accepted |= {change["from"] for change in record.get("data_changes", [])}
        if record["config"].get("data") != config["data"] and allow_data_change:
            accepted.add(record["config"].get("data"))
            data_change(record, config, data_record)  # one line if it is too large
        found = differences(same_data(flag_entries(record["config"]), accepted, config), flag_entries(config),
                            "the run")
        if found:
            hint = ("; if image files were deleted or replaced since, add --allow-data-change"
                    if any(line.startswith(DATA_ENTRY) for line in found) else "")
            raise SystemExit(f"error: cannot resume {out_dir} with other training flags: "
                             f"{'; '.join(found)}{hint}{refuse}")
    checkpoints = sorted(out_dir.rglob("checkpoint.pt"))
    for path in checkpoints:  # read without loading the tensors (mmap)
        saved = identity_entries(load_checkpoint(path, mmap=True).get("identity", {}))
        found = differences(same_data(saved, accepted, config), flag_entries(config), "the checkpoint",
                            names=flag_entries(config))
        if found:
            raise SystemExit(f"error: cannot resume {out_dir}: {path} is from another training run "
                             f"({'; '.join(found)}){refuse}")
    results = list(itertools.islice(run_results(out_dir), 4))
    if not checkpoints and results:  # a finished run whose checkpoint was deleted is never trained again
        which = f"{RUN_FILE} names its run, but" if record is not None else f"neither {RUN_FILE} nor"
        raise SystemExit(f"error: cannot resume {out_dir}: it holds results ({', '.join(map(str, results))}) "
                         f"but {which} no checkpoint.pt to continue from{refuse}")
    return record, sorted(accepted)


def same_data(entries, accepted, config):
    """A run's entries with its data fingerprint read as this data's where the run accepted it as such."""
    if entries.get(DATA_ENTRY) in accepted:
        entries = {**entries, DATA_ENTRY: config["data"]}
    return entries


def data_record(data):
    """What a data change may not alter (data_change): the classes, and the images per split within 1 %."""
    names = hashlib.sha1("\n".join(data.classes).encode()).hexdigest()[:16] if data.classes else None
    return {"classes": data.num_classes, "class_names": names, "train_images": len(data.train_y),
            "test_images": len(data.test_y)}


def data_change(record, config, now):
    """--resume --allow-data-change: the run's data changed since it started (an unreadable image deleted or
    replaced, as the stop line advised): accepted where the classes are the same and each split lost or
    gained at most 1 % of its images (else one line), and recorded in run.json ('data_changes', and the new
    fingerprint and counts), which the record (updated here) is written to."""
    before = record.get("data_record") or {}
    too_large = [f"{key.replace('_', ' ')} {before[key]} -> {now[key]}" for key in ("classes", "class_names")
                 if key in before and before[key] != now[key]]
    for split in ("train_images", "test_images"):
        if split in before and abs(now[split] - before[split]) > max(1, before[split] // 100):
            too_large.append(f"{split.replace('_', ' ')} {before[split]} -> {now[split]}")
    if too_large:
        raise SystemExit(f"error: --allow-data-change accepts deleted or replaced files, not other data: "
                         f"{', '.join(too_large)}; nothing was changed. Resume with the run's data, or start "
                         "afresh with --overwrite")
    change = {"from": record["config"]["data"], "to": config["data"],
              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              **{f"{split} before": before.get(split) for split in ("train_images", "test_images")},
              **{split: now[split] for split in ("train_images", "test_images")}}
    record.setdefault("data_changes", []).append(change)
    record["config"]["data"], record["data_record"] = config["data"], now
    log(f"--allow-data-change: the data changed since the run started (fingerprint {change['from']} -> "
        f"{change['to']}; {change['train_images before']} -> {now['train_images']} training, "
        f"{change['test_images before']} -> {now['test_images']} test images); recorded in {RUN_FILE}")


def folder_contents(out_dir):
    """The files under a run folder that a fresh run must not start over, as paths relative to it (a
    generator: `--out-dir ~` is not walked to its end): every file but the lock files, run.json, the log, the
    teacher's copy and a metrics.jsonl of no epoch, all that a run that stopped before its first epoch ended
    leaves (a fresh run replaces them)."""
    out_dir = Path(out_dir)
    for top, dirs, names in os.walk(out_dir):
        dirs.sort()
        for name in sorted(names):
            path = Path(top) / name
            empty_metrics = name == "metrics.jsonl" and path.stat().st_size == 0
            trivial = name in (".lock", RUN_LOG) or empty_metrics or \
                (name in (RUN_FILE, RUN_TEACHER) and Path(top) == out_dir)
            if not trivial:
                yield path.relative_to(out_dir)


def run_results(out_dir):
    """What fit wrote under a run folder (RUN_OUTPUTS at any depth: an SSKD run's phases), as in
    folder_contents."""
    return (path for path in folder_contents(out_dir) if path.name in RUN_OUTPUTS)


def clear_run_folder(out_dir):
    """--overwrite: empty the run folder (its lock file aside) and say in one line what was removed. Only a
    folder that holds a run (run.json or what fit writes) is emptied: `--out-dir ~` is refused."""
    entries = sorted(p for p in out_dir.iterdir() if p.name != ".lock")
    if not entries:
        return
    if not any((out_dir / name).exists() for name in (RUN_FILE, RUN_LOG, *RUN_OUTPUTS)):
        found = ", ".join(p.name for p in entries[:4])
        raise SystemExit(f"error: --overwrite empties a run folder, but {out_dir} holds no run ({RUN_FILE}, "
                         f"{RUN_LOG}, {', '.join(RUN_OUTPUTS)}), only {found}: nothing was removed; choose "
                         "another --out-dir")
    names = ", ".join(p.name + "/" * p.is_dir() for p in entries[:8]) + (", ..." if len(entries) > 8 else "")
    files = 0
    try:
        for path in entries:
            if path.is_dir() and not path.is_symlink():
                files += sum(1 for p in path.rglob("*") if not p.is_dir())
                shutil.rmtree(path)
            else:
                files += 1
                path.unlink()
    except OSError as error:
        raise SystemExit(f"error: --overwrite cannot remove {error.filename or path} "
                         f"({error.strerror or error})") from None
    log(f"--overwrite: removed the earlier run from {out_dir} ({files} files: {names})")


def claim_out_dir(args, data, script):
    """Before anything is trained: the run folder is writable and locked; a fresh run does not start over an
    existing one (unless --overwrite, which empties it first); --resume continues only the run it holds (see
    check_resume). run.json records the script, the training flags, the data and the command. Returns the
    data fingerprints that the run takes as this data's (this one, and any it had before accepted changes)."""
    out_dir = Path(args.out_dir)
    ensure_writable(out_dir, "--out-dir")
    lock_dir(out_dir, "--out-dir")
    config = training_config(args, data)
    if args.overwrite:
        clear_run_folder(out_dir)
    results = list(itertools.islice(folder_contents(out_dir), 4))  # none: a fresh run may take its place
    if not args.resume and results:
        raise SystemExit(f"error: {out_dir} already holds a run ({', '.join(map(str, results))}); add "
                         "--resume to continue it, or choose another --out-dir (--overwrite replaces it)")
    record, accepted = check_resume(out_dir, script, config, data_record(data), args.allow_data_change) \
        if args.resume else (None, [config["data"]])
    if record is None:
        record = {"script": script, "config": config, "command": command_line(),
                  "data_record": data_record(data)}
    save_json(record, out_dir / RUN_FILE)  # (a resume rewrites it as it was, or with the data change)
    run_log.open(out_dir / RUN_LOG)
    run_log.write(f"$ {command_line()}")  # the log starts with the command (not printed: the user typed it)
    return accepted


def command_line(extra=()):
    """The command that started this process, shell-quoted, with `extra` arguments appended (under torchrun,
    a torchrun command with the same number of processes per node)."""
    launcher = ["python"]
    if world_size() > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        nodes = world_size() // per_node
        launcher = ["torchrun", f"--nproc_per_node={per_node}"] + ([f"--nnodes={nodes}"] if nodes > 1 else [])
    return " ".join(shlex.quote(a) for a in [*launcher, *sys.argv, *extra])


# ---------------------------------------------------------------------------------- progress and stop lines

def log_start(title, recipe, steps_per_epoch, model, train_modules, device, fast):
    """The first line of a fit: what it trains (the model's parameters, and those that train where they
    differ: an SSKD phase's stage, a method's connectors), how, and the fast paths."""
    plan = f"{recipe['epochs']} epochs x {steps_per_epoch} steps, batch {recipe['batch_size']}"
    ranks = f" x {world_size()} ranks ({dist.get_backend()})" if world_size() > 1 else ""
    trained = {id(p): p.numel() for m in train_modules for p in m.parameters() if p.requires_grad}
    params = f"{count_params(model):,} params" + (f", {sum(trained.values()):,} trained"
                                                  if sum(trained.values()) != count_params(model) else "")
    log(f"{title}: {plan}, {recipe['optimizer']} lr {recipe['lr']}, {params}, device {device}{ranks}; "
        f"{describe(fast)}")


class ProgressLine:
    """Within an epoch, a line with loss, speed and ETA every `log_every` seconds (not after the last
    step)."""

    def __init__(self, epoch, recipe, steps_per_epoch, log_every, checkpoint_path):
        self.epoch, self.recipe, self.steps, self.log_every = epoch, recipe, steps_per_epoch, log_every
        self.checkpoint_path = checkpoint_path
        self.start = self.last_print = time.time()

    def maybe_log(self, step, loss_sum, seen, images_done):
        """loss_sum and seen: this rank's, for the mean loss so far; images_done: the images of all ranks so
        far (the global batches done), so that speed and ETA are the run's, not one rank's."""
        if time.time() - self.last_print <= self.log_every or step + 1 >= self.steps:
            return
        self.last_print = time.time()
        mean_loss = loss_sum / seen
        check_finite(mean_loss, self.epoch, self.checkpoint_path, self.recipe)
        speed = images_done / (self.last_print - self.start)
        epoch_seconds = self.steps * self.recipe["batch_size"] / speed
        eta = epoch_seconds * (self.recipe["epochs"] - self.epoch) - (self.last_print - self.start)
        log(f"  epoch {self.epoch + 1} step {step + 1}/{self.steps} loss {mean_loss.item():.4f} "
            f"{speed:.0f} img/s ETA {format_seconds(eta)} (training only)")


def log_epoch(row, epochs, history):
    """The line of an ended epoch: its metrics, lr, speed, time, and the ETA of the run."""
    eta = (epochs - row["epoch"]) * sum(h["seconds"] for h in history) / len(history)
    not_shown = ("epoch", "lr", "images_per_sec", "seconds")
    shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in not_shown)
    log(f"epoch {row['epoch']}/{epochs} {shown} lr {row['lr']:.4g} {row['images_per_sec']:.0f} img/s "
        f"{row['seconds']:.1f}s ETA {format_seconds(eta)}")


def format_seconds(s):
    if s >= 3600:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def check_finite(loss_sum, epoch, checkpoint_path, recipe):
    if not torch.isfinite(loss_sum):
        kept = (f"the last good checkpoint {checkpoint_path} is intact" if checkpoint_path.exists()
                else "no checkpoint was written")
        raise FloatingPointError(
            f"the training loss became NaN/inf in epoch {epoch + 1}; stopped ({kept}). Start afresh with a "
            f"lower --lr (this run's is {recipe['lr']:g}) or lower loss weights, adding --overwrite (or "
            "another --out-dir): --resume continues only with the same flags, and would repeat it")


class Terminated(KeyboardInterrupt):
    """SIGTERM, what cluster schedulers send before they pre-empt a job: stops a run as Ctrl-C does."""


def raise_terminated(signum, frame):
    raise Terminated


def where_the_run_stands(file_to_fix=False):
    """For a stop message: the newest complete checkpoint of this run and the command that resumes it (with
    file_to_fix, once an unreadable file is replaced or deleted: --allow-data-change)."""
    if last_checkpoint:
        where = (f"the last complete checkpoint is {last_checkpoint['path']} (epoch "
                 f"{last_checkpoint['epoch']}/{last_checkpoint['epochs']})")
    else:
        where = "no checkpoint was saved yet"
    if file_to_fix:
        return f"{where[0].upper()}{where[1:]}; replace the file or delete it, then go on with: " \
               f"{resume_command(['--allow-data-change'])}"
    return f"{where}; to resume: {resume_command()}"


def resume_command(extra=()):
    """This command with --resume (and `extra`), and the run folder named when it was the default one, whose
    name depends on the data's fingerprint (a data change would otherwise start a new run elsewhere)."""
    extra = [flag for flag in ["--resume", *extra] if flag not in sys.argv]
    if run_log.folder and "--out-dir" not in sys.argv:
        extra = ["--out-dir", str(run_log.folder), *extra]
    return command_line(extra)


def stopped_from_outside(error):
    """What a RuntimeError that another process caused says, in a few words, or None for any other (a bug,
    whose traceback is wanted): a decoding worker killed (the out-of-memory killer, a signal), or under
    torchrun another rank gone, which its own traceback or torchrun's report explains."""
    text = " ".join(str(error).split())
    if "DataLoader worker" in text:
        return f"a decoding worker process stopped ({text[:120]}; the out-of-memory killer, or a signal)"
    lost = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL")
    distributed_error = isinstance(error, getattr(dist, "DistError", ())) or any(s in text for s in lost)
    if world_size() > 1 and distributed_error:
        return "another process of this torchrun job stopped (the collective operation failed)"
    return None


def run_main(main):
    """A NaN stop, Ctrl-C, SIGTERM, a lost rank or decoding worker end in one clear line with the exact
    command that resumes (exit code 1, 130 or 143), not a traceback. Under torchrun every rank stops with
    the same exit code and only rank 0 prints (the others' argparse and warning output is dropped, not
    their tracebacks); the process group is left on every exit."""
    previous_handler = signal.signal(signal.SIGTERM, raise_terminated)
    quiet = contextlib.redirect_stderr(io.StringIO()) if rank() != 0 else contextlib.nullcontext()
    try:
        with quiet:
            main()
    except FloatingPointError as error:
        log(f"error: {error}")
        sys.exit(1)
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        log(f"interrupted{' (SIGTERM)' if terminated else ''}: {where_the_run_stands()}")
        sys.exit(143 if terminated else 130)
    except UnreadableFile as error:  # said by the rank that read the file (under torchrun, not always 0)
        print(f"error: cannot read {error}: a run does not skip images. {where_the_run_stands(True)}",
              flush=True)
        run_log.write(f"error: cannot read {error}")
        sys.exit(1)
    except RuntimeError as error:
        cause = stopped_from_outside(error)
        if cause is None:  # a bug: its traceback is wanted
            raise
        log(f"error: {cause}; {where_the_run_stands()}")
        sys.exit(1)
    except SystemExit as stop:
        if rank() != 0 and isinstance(stop.code, str):
            sys.exit(1)  # rank 0 prints the line
        if isinstance(stop.code, str):
            run_log.write(stop.code)
        raise
    finally:
        run_log.start()  # closes the run's log
        signal.signal(signal.SIGTERM, previous_handler)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- command line

def number(text, kind, is_valid, description):
    """`text` as int or float (`kind`), or argparse's one-line error 'argument --flag: must be ...'."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not is_valid(value):
        raise argparse.ArgumentTypeError(f"must be {description}, not {text!r}")
    return value


def positive_int(text):
    return number(text, int, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text):
    return number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text):
    return number(text, float, lambda v: v > 0, "a positive number")


def nonnegative_float(text):
    return number(text, float, lambda v: v >= 0, "a number >= 0")


MAX_SEED = 2 ** 32 - 1  # numpy's limit; train_batches' seed * 100_003 + epoch then fits torch's int64

def seed_int(text):
    return number(text, int, lambda v: 0 <= v <= MAX_SEED, f"an integer in 0..{MAX_SEED}")


def path_flag(text):
    """A path: any string but the empty one (`--out-dir ""` would silently mean the default folder)."""
    if not text:
        raise argparse.ArgumentTypeError("must be a path, not an empty string")
    return text


def fraction(text):
    return number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def area_fraction(text):
    return number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def device_name(text):
    """--device: a torch device that this machine has (cpu, cuda, cuda:N, mps)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not available: no CUDA device is visible; use "
                                             "--device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r} is not available: {count} CUDA device(s) are "
                                             f"visible, cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; use cuda, cuda:N or cpu")
    return text


def family_defaults(key):
    """'cifar: cnn 64, token 128; imagenet: ...': a recipe entry's defaults, for --help (from RECIPES)."""
    return "; ".join(f"{setting}: " + ", ".join(f"{family} {row[key]}" for family, row in rows.items())
                     for setting, rows in RECIPES.items())


def add_common_args(parser):
    """Flags every script shares: data, recipe, output, device. Recipe flags left unset take the model
    family's default (see make_recipe)."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100",
                   choices=["cifar100", "cifar10", "folder", "imagenet", "synthetic"],
                   help="cifar100/cifar10 (torchvision files in --data-dir), folder (DIR/train/<class>/**, "
                        "DIR/test/<class>/**), imagenet (DIR/train/<wnid>/*.JPEG, DIR/val/<wnid>/*.JPEG), "
                        "or synthetic (generated, for smoke runs and tests)")
    g.add_argument("--data-dir", type=path_flag, default="data", help="where the dataset is (default: data)")
    g.add_argument("--image-size", type=positive_int, metavar="S",
                   help="input side in pixels (default: the models' own, 32 for the CIFAR zoo, 224 for the "
                        "ImageNet ones)")
    g.add_argument("--store-size", type=positive_int, metavar="S0",
                   help="the side at which the images are kept on the device (default: CIFAR's own 32; "
                        "folder and synthetic images are made or resized to --image-size); below "
                        "--image-size, each training batch is upsampled by a random resized crop there and "
                        "test images by a bilinear resize")
    g.add_argument("--augment", choices=["pad-crop", "resized-crop"],
                   help="training augmentation, each with a horizontal flip: pad-crop (4-pixel zero padding, "
                        "random crop: the CIFAR benchmark's) or resized-crop (torchvision's "
                        "RandomResizedCrop, see --crop-scale); default: pad-crop where the images are kept "
                        "at --image-size, resized-crop where they are upsampled")
    g.add_argument("--crop-scale", type=area_fraction, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"),
                   help="resized-crop: the crop's area fraction range (default 0.08 1, torchvision's)")
    g.add_argument("--crop-ratio", type=positive_float, nargs=2, default=[3 / 4, 4 / 3],
                   metavar=("MIN", "MAX"),
                   help="resized-crop: the crop's aspect ratio range (default 3/4 4/3, torchvision's)")
    g.add_argument("--train-subset", type=nonnegative_int, default=0, metavar="N",
                   help="train on a class-balanced subset of N images (fixed choice, same for every seed)")
    g.add_argument("--pipeline", choices=["auto", "device", "stream"], default="auto",
                   help="folder and imagenet: device (all images decoded once, kept on the device) or stream "
                        "(decoded batch by batch in --workers processes); auto (default): stream when the "
                        "decoded images would take more than --device-data-limit")
    g.add_argument("--device-data-limit", type=positive_float, default=8.0, metavar="GB",
                   help="--pipeline auto streams a folder whose decoded images exceed this (default 8 GB)")
    g.add_argument("--workers", type=nonnegative_int, metavar="N",
                   help="stream: decoding processes per rank (default: this machine's cores per rank less "
                        "one, at most 16; 0 decodes in the training process)")
    g.add_argument("--eval-resize", type=positive_int, metavar="R",
                   help="stream: test images resized to R on their shorter side, then center-cropped to "
                        "--image-size (default: 256 for 224, in proportion for other sizes: torchvision's "
                        "ImageNet evaluation)")
    g = parser.add_argument_group("training recipe (unset: the --recipe row of the student's family)")
    g.add_argument("--recipe", choices=list(RECIPES),
                   help="the recipe table's row: cifar (the CIFAR benchmark's), imagenet (the KD "
                        "benchmarks' ImageNet recipe), ofa (OFA-KD's 224-px CIFAR-100 recipe); default: "
                        "imagenet for --dataset imagenet, ofa for CIFAR at --image-size other than 32, "
                        "else cifar")
    g.add_argument("--epochs", type=positive_int, help=f"training epochs ({family_defaults('epochs')})")
    g.add_argument("--batch-size", type=positive_int, help=f"batch size ({family_defaults('batch_size')})")
    g.add_argument("--lr", type=positive_float, help=f"peak learning rate ({family_defaults('lr')}; "
                   + ", ".join(f"{name} {lr}" for name, lr in DEFAULT_LR.items()) + ")")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], help=family_defaults("optimizer"))
    g.add_argument("--momentum", type=fraction, help="SGD momentum (0.9)")
    g.add_argument("--weight-decay", type=nonnegative_float,
                   help=f"weight decay ({family_defaults('weight_decay')})")
    g.add_argument("--schedule", choices=["step", "cosine"], help=family_defaults("schedule"))
    g.add_argument("--milestones", type=positive_int, nargs="+",
                   help="step schedule epochs (default: cifar 62.5/75/87.5 %%, imagenet 30/60/90 %% of "
                        "--epochs: 150 180 210 of 240, 30 60 90 of 100)")
    g.add_argument("--lr-decay", type=positive_float, help="step schedule factor (0.1)")
    g.add_argument("--warmup-epochs", type=nonnegative_float,
                   help="linear lr warm-up (cifar: cnn 0, token min(5, epochs/10); imagenet: cnn 0, token 5; "
                        "ofa: cnn 0, token 20)")
    g.add_argument("--label-smoothing", type=fraction,
                   help=f"cross-entropy label smoothing ({family_defaults('label_smoothing')})")
    g.add_argument("--grad-clip", type=nonnegative_float, help="clip the gradient norm (default off)")
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of initialisation and augmentation (default 0)")
    g.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu")
    g.add_argument("--out-dir", type=path_flag,
                   help="where metrics.jsonl, summary.json and checkpoints go (default under runs/)")
    start = g.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --out-dir from its last complete epoch (refused if the "
                            "script, a training flag or the data differs from the run's; starts afresh if it "
                            "holds no run)")
    g.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: go on although image files were deleted or replaced since the run's "
                        "last checkpoint (the same classes, at most 1 %% more or fewer images per split), as "
                        "the line of a run stopped by an unreadable file advises; recorded in run.json")
    start.add_argument("--overwrite", action="store_true",
                       help="start afresh in an --out-dir that holds a run: it is emptied first (without "
                            "this flag, that is refused)")
    g.add_argument("--eval-every", type=positive_int, default=1, metavar="N",
                   help="evaluate on the test set every N epochs and after the last (default 1); best-epoch "
                        "accuracy is then the best of the evaluated epochs, listed in summary.json")
    g.add_argument("--log-every", type=nonnegative_float, default=30,
                   help="seconds between progress lines within an epoch")
    g.add_argument("--checkpoint-dir", type=path_flag, default="checkpoints",
                   help="where teachers are looked for and saved")
    g = parser.add_argument_group("speed (defaults depend on the device; the first log line of a run shows "
                                  "them)")
    g.add_argument("--amp", choices=["bf16", "off"],
                   help="bf16 autocast of forward and loss (default: bf16 on CUDA, off on CPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format for images and models (default: on, on CUDA and CPU)")
    g.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead",
                   "max-autotune"], metavar="MODE",
                   help="torch.compile the forward and loss of the training step (its backward follows) in "
                        "this mode: default (kernel fusion; the mode when MODE is left out), reduce-overhead "
                        "(fusion + CUDA graphs, for launch-bound steps on CUDA), max-autotune. The first "
                        "steps of each batch size are slow while it compiles")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on CUDA: BatchNorm statistics of the trained modules over all ranks' "
                        "images (default: each rank's own part of the batch)")
    g.add_argument("--deterministic", action="store_true",
                   help="reproducible CUDA runs: deterministic algorithms where torch has them (a warning "
                        "names the ops that have none), cuDNN benchmark and TF32 off. CPU runs are always "
                        "reproducible")


def add_distill_args(parser):
    g = parser.add_argument_group("teacher and student")
    g.add_argument("--teacher", default="resnet32x4", choices=MODEL_NAMES, metavar="NAME",
                   help="teacher architecture (default %(default)s)")
    g.add_argument("--student", default="resnet8x4", choices=MODEL_NAMES, metavar="NAME",
                   help="student architecture (default %(default)s); names: " + ", ".join(MODEL_NAMES))
    g.add_argument("--teacher-ckpt", type=path_flag,
                   help="teacher checkpoint; default: checkpoints/<data>/<teacher>.pth or the public "
                        "checkpoints/<teacher>_vanilla/ckpt_epoch_240.pth, else the teacher is trained first")
    g.add_argument("--teacher-weights", metavar="WEIGHTS",
                   help="a torchvision teacher (tv_*) from torchvision's weights of that name, e.g. "
                        "IMAGENET1K_V1: the weights themselves for ImageNet's 1000 classes; for other data, "
                        "fine-tuned from them for --teacher-epochs with a new head and cached as "
                        "<teacher>-<WEIGHTS>_<E>ep.pth (or by common.py --pretrained --save-as-teacher)")
    g.add_argument("--teacher-epochs", type=positive_int, default=STANDARD_TEACHER_EPOCHS,
                   help="the teacher's epochs: a cached teacher must have them (<teacher>.pth for 240, "
                        "<teacher>_<E>ep.pth for E others), a missing one is trained for them with the "
                        "standard recipe (default %(default)s)")


def meta_pair(args):
    """The run's teacher and student built on the meta device (no memory, no time), the teacher frozen as
    load_teacher leaves it, and the run's image size: for a method to build its modules once before any data
    is read or any teacher trained, so that whatever the names and shapes rule out stops the run first."""
    with torch.device("meta"):
        teacher, student = create_model(args.teacher, 10), create_model(args.student, 10)
    return teacher.eval().requires_grad_(False), student, image_size_of(args)


def run_options(args, teacher=None):
    """fit's keyword arguments that a script's command line sets: `fit(..., **run_options(args, teacher))`."""
    return dict(seed=args.seed, resume=args.resume, eval_every=args.eval_every, log_every=args.log_every,
                fast=fast_paths(args, torch.device(args.device)), config=vars(args),
                teacher=teacher_record(teacher) if teacher is not None else None)


def setup(args, script, parser):
    """Seed, device, data and the run folder, the same for every script (`script`: common, blockwise_kd, sskd
    or lfcc): every check that can fail happens here, before anything is trained (see claim_out_dir). Under
    torchrun the process group comes first, and rank 0 alone claims the run folder for all."""
    run_log.start()
    init_distributed(args)
    device = torch.device(args.device)  # checked by device_name when parsed
    if args.sync_bn and device.type != "cuda":
        raise SystemExit("error: --sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it on CPU")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # for reproducible cuBLAS matmuls
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = args.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.deterministic
    data = on_rank_0_first(load_data, args, device)  # a download happens once
    if args.out_dir is None:
        run_name = args.model if script == "common" else f"{script}_{args.teacher}_{args.student}"
        args.out_dir = default_out_dir(args, parser, run_name, data)
    # The recipe's row and length, resolved once the folder is named (the defaults are not in its name), so
    # that run.json records them and a resume compares them.
    args.recipe, args.epochs = recipe_setting(args), run_epochs(args)
    teacher_to_train = getattr(args, "teacher", None) and teacher_source(args, data)[0] == "train"
    check_batch_split(args, data, script, teacher_to_train)
    args.accepted_data = on_rank_0(claim_out_dir, args, data, script)  # for the checkpoints' checks (fit)
    if teacher_to_train:
        on_rank_0(ensure_writable, teacher_candidates(args, data)[0].parent, "--checkpoint-dir")
    if isinstance(data, StreamedData):
        plural = "es" if data.workers > 1 else ""
        decoders = (f"{data.workers} worker process{plural} per rank" if data.workers
                    else "the training process")
        pipeline = (f", streamed, decoded by {decoders} (resized-crop to {data.image_size}px; test: resize "
                    f"{data.eval_resize}, center crop)")
    elif data.augment == "pad-crop":
        pipeline = ", on the device (pad-crop)"
    else:
        pipeline = f", on the device, kept at {data.stored_size}px, {data.augment} to {data.image_size}px"
    log(f"data: {data.name}, {len(data.train_y)} train / {len(data.test_y)} test images, {data.num_classes} "
        f"classes{pipeline}, fingerprint {data.fingerprint}; output: {args.out_dir}")
    torch.manual_seed(args.seed)
    return device, data


# ---------------------------------------------------------------------------------------- torchrun

def world_size():
    """The number of processes training together: torchrun's WORLD_SIZE once the process group is up,
    else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    """This process's place among them (0 alone; torchrun's RANK before the group is up): rank 0 logs and
    writes every file."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def sum_across_ranks(values):
    """{name: tensor} with every tensor summed over the ranks (one all_reduce; unchanged in a single
    process)."""
    if world_size() == 1:
        return values
    stacked = torch.stack([v.float() for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked))


class TrainedModules(nn.Module):
    """What DDP wraps under torchrun: the trained modules, with the method's loss as the forward, so that the
    gradients of all of them are averaged over the ranks in the backward pass (OFA-KD's pattern: the whole
    distiller in DDP, the frozen teacher held by the loss, outside it)."""

    def __init__(self, modules, loss_fn):
        super().__init__()
        self.trained = nn.ModuleList(modules)
        self.loss_fn = loss_fn

    def forward(self, x, y, progress):
        return self.loss_fn(x, y, progress)


def distributed_loss(train_modules, loss_fn, device, sync_bn=False):
    """loss_fn through DistributedDataParallel over the train modules (their BatchNorms synchronised across
    ranks first with sync_bn). DDP starts every rank from rank 0's parameters and buffers."""
    if sync_bn:
        for module in train_modules:
            synchronise_batchnorm(module)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(TrainedModules(train_modules, loss_fn), device_ids=device_ids)


def init_distributed(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL with one GPU per rank (cuda:LOCAL_RANK,
    for --device cuda) or gloo on CPU. --batch-size stays the global batch, split over the ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is not None:
            raise SystemExit(f"error: under torchrun use --device cuda, not {args.device}: rank r takes "
                             f"cuda:LOCAL_RANK (set CUDA_VISIBLE_DEVICES to choose the GPUs)")
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def on_rank_0(fn, *args, share=True):
    """fn(*args) on rank 0 alone (the run-folder claim, the lock, a file copy), its result returned on every
    rank (with share; else on rank 0 only); its refusal, a SystemExit with a message, reaches every rank, so
    that all stop with rank 0's line instead of waiting for it or adding a traceback of their own."""
    if world_size() == 1:
        return fn(*args)
    outcome, result = [None, None], None  # [exit code, shared result]
    if rank() == 0:
        try:
            result = fn(*args)
            outcome[1] = result if share else None
        except SystemExit as stop:
            outcome[0] = stop.code if stop.code is not None else 0
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise SystemExit(outcome[0])
    return result if rank() == 0 else outcome[1]


def on_rank_0_first(fn, *args):
    """fn(*args) on rank 0, then on the other ranks (so that rank 0 alone downloads a dataset); rank 0's
    refusal (a bad flag, an unreadable file) stops every rank with its one line, as on_rank_0's."""
    if world_size() == 1:
        return fn(*args)
    result = on_rank_0(fn, *args, share=False)
    return result if rank() == 0 else fn(*args)


def from_rank_0(value):
    """Rank 0's value on every rank (a decision taken from the disk as rank 0 sees it)."""
    if world_size() == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def check_batch_split(args, data, script, teacher_to_train):
    """Under torchrun every global batch is split over the ranks: the batch size must divide by the world
    size, and the epoch's last, smaller batch must give every rank an image (one line otherwise); so must
    the batch of a teacher that will be trained first (its recipe's, see train_teacher)."""
    world = world_size()
    if world == 1:
        return
    student = args.model if script == "common" else args.student
    recipe_batch = RECIPES[recipe_setting(args)][model_family(student)]["batch_size"]
    batches = [("--batch-size", args.batch_size or recipe_batch)]
    if teacher_to_train:
        batches.append(("the teacher's batch", RECIPES[recipe_setting(args)][model_family(args.teacher)]
                        ["batch_size"]))
    for what, batch in batches:
        last = len(data.train_y) % batch
        if batch % world:
            raise SystemExit(f"error: {what} {batch} (the global batch) does not split evenly over the "
                             f"{world} ranks; choose a multiple of {world}")
        if 0 < last < world:
            raise SystemExit(f"error: the last batch of an epoch holds {last} images "
                             f"({len(data.train_y)} mod {batch}), fewer than the {world} ranks; change "
                             f"--train-subset or {what}")


def synchronise_batchnorm(module):
    """--sync-bn: every BatchNorm inside `module` becomes a SyncBatchNorm in place (the same parameters and
    statistics, the same state_dict keys), so that its statistics are over all ranks' images."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            module.add_module(name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            synchronise_batchnorm(child)


# -------------------------------------------------------------------------------------------- image folders

# What torchvision's ImageFolder reads (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp), and the other
# names of JPEG and the Netpbm and GIF files that Pillow reads. Any other file is counted, named, not read.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm", ".pnm"}


class UnreadableFile(Exception):
    """An image file that fails to decode once the run has started (streamed: 'path (why)'). It stops the
    run, in one line (run_main) naming it, the last complete checkpoint and the command that goes on once
    the file is replaced or deleted."""


class UnsupportedImage(ValueError):
    """An image Pillow decodes but that has no defined 8-bit reading (32-bit integer or float pixels)."""


def check_pixel_depth(img):
    """Refuse (UnsupportedImage) a Pillow image of 32-bit integer or float pixels, from its header; 16-bit
    ones (modes I;16*, and I in a PNG, which has at most 16 bits per channel) have an 8-bit reading."""
    if img.mode in ("I", "F") and not (img.mode == "I" and img.format == "PNG"):
        raise UnsupportedImage(f"32-bit {'integer' if img.mode == 'I' else 'float'} pixels have no "
                               "defined 8-bit scale; save it with 8 or 16 bits per channel")


def read_image(path, size=32):
    """One image file as an RGB size x size uint8 array (H, W, 3) (size None: its own). 16-bit greyscale is
    scaled to 8 bits (Pillow's convert('RGB') clips it: a 46 % grey would become white); 32-bit integer or
    float pixels are refused."""
    from PIL import Image  # torchvision depends on Pillow

    with Image.open(path) as img:
        img.load()  # decodes the whole file: a truncated one fails here
        check_pixel_depth(img)
        if img.mode.startswith("I"):  # 16 bits, after check_pixel_depth
            grey = np.round(np.asarray(img, dtype=np.float64) / 257).astype(np.uint8)
            img = Image.fromarray(grey, "L")
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img)


def unreadable_reason(path, error):
    """Why reading the image at `path` failed, in a few words (never an error itself: a file may vanish)."""
    from PIL import UnidentifiedImageError

    try:
        empty = Path(path).stat().st_size == 0
    except OSError as missing:
        return ("no such file: deleted, or a link to nothing" if isinstance(missing, FileNotFoundError)
                else f"cannot be read: {missing.strerror or missing}")
    if empty:
        return "empty file"
    if isinstance(error, UnsupportedImage):
        return str(error)
    if isinstance(error, UnidentifiedImageError):
        return "not an image format Pillow can read"
    return "cannot be decoded: " + (" ".join(str(error).split())[:100] or type(error).__name__)


def files_under(folder):
    """Every file under `folder` at any depth, sorted (symbolic links followed, as ImageFolder does, each
    folder once), and the hidden entries (names starting with '.') left out, with what they hold."""
    files, hidden, seen = [], [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back to a folder already read
            dirs[:] = []
            continue
        seen.add(real)
        hidden += [Path(top) / name for name in sorted(dirs + names) if name.startswith(".")]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(top) / name for name in sorted(names) if not name.startswith(".")]
    return files, hidden


def list_image_folder(root, splits=None):
    """The classes of `root/<split>/<class>/**` and, per split, its image files and labels: both splits with
    the same class folders, each with images. Names starting with '.' (.ipynb_checkpoints, .DS_Store) are
    neither classes nor images; they and the files that are not images by their extension are counted and
    named in one log line. Returns (classes, {split: ([path, ...], [label, ...])})."""
    root = Path(root).expanduser()
    splits = splits or ("train", "test")
    first, second = splits
    if not (root / first).is_dir() or not (root / second).is_dir():
        layout = f"{root}/{first}/<class>/ and {root}/{second}/<class>/"
        raise SystemExit(f"error: {root}/ has no {first}/ and {second}/ folders of class sub-folders: put "
                         f"the images in {layout} (benchmarks/README.md writes torchvision's CIFAR-10 that "
                         "way), or pass --data-dir DIR where they are")
    entries = {split: sorted((root / split).iterdir()) for split in splits}
    class_lists = {split: [p.name for p in found if p.is_dir() and not p.name.startswith(".")]
                   for split, found in entries.items()}
    classes, test_classes = class_lists[first], class_lists[second]
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise SystemExit(f"error: {root}/{first}/ and {root}/{second}/ have different classes: only in "
                         f"{first}/: {', '.join(only_train) or 'none'}; only in {second}/: "
                         f"{', '.join(only_test) or 'none'}")
    if not classes:
        raise SystemExit(f"error: no class folders found under {root}/{first}/ (expected {first}/<class>/ "
                         "folders)")
    hidden = [p for found in entries.values() for p in found if p.name.startswith(".")]
    not_images = [p for found in entries.values() for p in found
                  if not p.is_dir() and not p.name.startswith(".")]
    listed = {}
    for split in splits:
        paths, labels = [], []
        for label, cls in enumerate(classes):
            files, hidden_here = files_under(root / split / cls)
            hidden += hidden_here
            for path in files:
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    not_images.append(path)
                    continue
                paths.append(path)
                labels.append(label)
        listed[split] = paths, labels
    empty = [f"{split}/{classes[c]}/" for split, (_, labels) in listed.items()
             for c in sorted(set(range(len(classes))) - set(labels))]
    if empty:
        raise SystemExit(f"error: {root}/: no images in {', '.join(empty)}; every class needs training and "
                         "test images (a class without test images would not be measured)")
    skipped = [f"{len(found)} {what} (e.g. {found[0].relative_to(root)})"
               for found, what in ((hidden, "hidden entries, names starting with '.', ignored"),
                                   (not_images, "files that are not images by their extension")) if found]
    if skipped:
        log(f"{root}/: not read: {'; '.join(skipped)}; image extensions: "
            f"{' '.join(sorted(IMAGE_EXTENSIONS))}")
    return classes, listed


def load_image_folder(root, size=32, splits=None, listing=None):
    """`root/train/<class>/**` and `root/test/<class>/**`, any size and mode, as RGB size x size uint8.

    Both splits must have the same class folders, each with images, and every image file (at any depth under
    its class folder) must be readable: a run refuses rather than skips, so that a benchmark never trains or
    tests on fewer images than the folder holds (see list_image_folder for what is not read; `listing`: its
    result, when the folder was listed already)."""
    root = Path(root).expanduser()
    classes, listed = listing or list_image_folder(root, splits)
    tensors, unreadable, total = [], [], sum(len(paths) for paths, _ in listed.values())
    for paths, labels in listed.values():
        images = []
        for path in paths:
            try:
                images.append(read_image(path, size))
            except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... by format
                unreadable.append((path, unreadable_reason(path, error)))
        if not unreadable:
            images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
            tensors += [images, torch.tensor(labels)]
    if unreadable:
        path, reason = unreadable[0]
        raise SystemExit(f"error: cannot read {path} ({reason}); {len(unreadable)} of the {total} image "
                         f"files under {root}/ cannot be read in all. Replace or delete them: a run does not "
                         "skip images")
    return tensors, len(classes)


# -------------------------------------------------------------------------------- streamed image folders

IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's


class StreamedData:
    """An image folder too large for the device, decoded batch by batch in DataLoader worker processes.

    The same interface as Data where the loop reads it (labels, classes, fingerprint, image_size, device,
    normalize) and its own train_batches and test_batches. Each epoch's plan (the order, every sample's crop
    box and flip) is drawn in the main process from (seed, epoch) and the image sizes read beforehand, so
    a batch does not depend on the number of workers, and a resumed run sees the same images in the same
    order. The workers only decode, crop, resize and flip, into uint8; conversion, normalisation and the
    memory format happen on the training device. Training: torchvision's RandomResizedCrop
    (resized_crop_boxes, --crop-scale, --crop-ratio) and a flip; evaluation: torchvision's Resize(R) +
    CenterCrop(S), R = --eval-resize (256 at 224), with torchvision's own functions."""

    def __init__(self, name, listed, sizes, num_classes, image_size, eval_resize, workers, crop_scale,
                 crop_ratio, mean, std, device, fingerprint):
        (self.train_paths, train_y), (self.test_paths, test_y) = listed
        self.train_sizes, self.test_sizes = sizes  # (N, 2) int64: each image's height and width
        self.train_y, self.test_y = torch.tensor(train_y).to(device), torch.tensor(test_y).to(device)
        self.name, self.num_classes, self.image_size, self.device = name, num_classes, image_size, device
        self.eval_resize, self.workers, self.fingerprint = eval_resize, workers, fingerprint
        self.classes = None  # set by load_data
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    normalize = Data.normalize

    def subset(self, keep):
        self.train_paths = [self.train_paths[i] for i in keep.tolist()]
        self.train_sizes, self.train_y = self.train_sizes[keep], self.train_y[keep.to(self.train_y.device)]

    def train_plan(self, batch_size, seed, epoch, shard):
        """This rank's part of every global batch of the epoch: lists of (index, top, left, h, w, flip)."""
        n = len(self.train_paths)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
        heights, widths = self.train_sizes[order].unbind(1)
        boxes = resized_crop_boxes(n, heights, widths, self.crop_scale, self.crop_ratio, g)
        flips = torch.rand(n, generator=g) < 0.5
        rows = torch.cat([order[:, None], boxes, flips[:, None].long()], 1).tolist()
        return [rows[slice(*shard_bounds(start, min(start + batch_size, n), *shard))]
                for start in range(0, n, batch_size)]

    def batches(self, split, plan, channels_last):
        """The plan's batches of `split` ("train" or "test"), decoded by the workers, on the device."""
        train = split == "train"
        transform = ("train", self.image_size) if train else ("test", self.image_size, self.eval_resize)
        paths, labels = (self.train_paths, self.train_y) if train else (self.test_paths, self.test_y)
        loader = torch.utils.data.DataLoader(
            DecodedImages(paths, transform), batch_sampler=plan, num_workers=self.workers,
            collate_fn=collate_decoded, pin_memory=self.device.type == "cuda",
            worker_init_fn=leave_stops_to_main)
        decoded = None
        try:
            with stop_signals_held():
                decoded = iter(loader)  # starts the workers
            for rows in plan:
                x, failed = next(decoded)
                if failed:
                    raise UnreadableFile(failed)
                x = self.normalize(x.to(self.device, non_blocking=True))
                index = torch.tensor([row[0] for row in rows], device=labels.device)
                yield (x.contiguous(memory_format=torch.channels_last) if channels_last else x), labels[index]
        finally:  # the workers stop now (the iterator's end), also when the loop does early (a signal, error)
            del decoded

    def train_batches(self, batch_size, seed, epoch, channels_last=False, shard=(0, 1)):
        return self.batches("train", self.train_plan(batch_size, seed, epoch, shard), channels_last)

    def test_batches(self, batch_size=500, channels_last=False, shard=(0, 1)):
        bounds = test_batch_bounds(len(self.test_y), batch_size, shard)
        return self.batches("test", [[(i,) for i in range(lo, hi)] for lo, hi in bounds], channels_last)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def stop_signals_held():
    """Ctrl-C and SIGTERM held back while worker processes start, and raised right after: the workers start
    with both blocked (then ignore them, leave_stops_to_main), and this process's handlers only note them
    meanwhile. (Blocking them in this thread alone is not enough: the operating system hands a signal to any
    thread that does not block it, torch's own threads too, and Python then raises it in this one, in the
    middle of a DataLoader's construction.)"""
    arrived = []
    handlers = {stop: signal.signal(stop, lambda signum, frame: arrived.append(signum))
                for stop in STOP_SIGNALS}
    blocks = hasattr(signal, "pthread_sigmask")  # not on Windows
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if blocks else None
    try:
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
        if arrived:
            signal.raise_signal(arrived[0])


def kill_leftover_workers():
    """At exit, the decoding workers still alive are killed: they ignore SIGTERM (leave_stops_to_main), the
    signal with which multiprocessing's own exit handler, which runs after this one, ends them before it
    waits for them, forever otherwise (a DataLoader iterator kept alive by an error's traceback)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(kill_leftover_workers)


def leave_stops_to_main(worker_id=None):
    """In a worker process: Ctrl-C and SIGTERM (sent to the whole process group by a terminal or a
    scheduler) are the training process's to handle; it then stops the workers, and says one line."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class DecodedImages(torch.utils.data.Dataset):
    """Image files decoded in a worker: rows (index, top, left, h, w, flip) into training crops, rows
    (index,) into evaluation ones. Returns (uint8 (3, S, S) tensor, None), or (None, "path (why)")."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __getitem__(self, row):
        path = self.paths[row[0]]
        try:
            if self.transform[0] == "train":
                return decode_crop(path, row[1:5], self.transform[1], bool(row[5])), None
            return decode_center(path, *self.transform[1:]), None
        except Exception as error:  # the main process stops naming the file
            return None, f"{path} ({unreadable_reason(Path(path), error)})"


def collate_decoded(samples):
    failed = next((why for image, why in samples if why), None)
    return (None if failed else torch.stack([image for image, _ in samples])), failed


# torchvision 0.29 deprecates its image decoders for TorchCodec (not a dependency here); decode_crop uses them
# while they exist and Pillow after.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def decode_rgb(path):
    """An image file as RGB uint8 (3, H, W), the one decoding of the streamed training and evaluation images:
    torchvision.io (libjpeg-turbo, libpng, libwebp straight into a tensor; the first frame of an animated
    image) where it reads the file into 8 bits, else Pillow through read_image, as the device pipeline
    (other formats, 16-bit pixels scaled, 32-bit refused, or a torchvision without the decoders). Per core
    about twice the speed of Pillow (benchmarks/data_pipeline.py); the same pixels for JPEG and GIF."""
    image = None
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        decode_image = None
    if decode_image is not None:
        encoded = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        try:
            image = decode_image(encoded, mode=ImageReadMode.RGB)
        except RuntimeError as error:
            if "Unsupported image file" not in str(error):
                raise ValueError(str(error).rsplit(", ", 1)[-1]) from None  # not torchvision's source line
    if image is not None and image.dim() == 4:  # the frames of an animated GIF or WebP
        image = image[0]
    if image is None or image.dtype != torch.uint8:
        image = torch.from_numpy(read_image(path, size=None)).permute(2, 0, 1)
    return image


def decode_crop(path, box, size, flip):
    """A training crop as uint8 (3, size, size): the decoded file's box (top, left, h, w) resized by torch's
    antialiased bilinear uint8 kernel, flipped."""
    top, left, h, w = box
    crop = decode_rgb(path)[None, :, top:top + h, left:left + w]
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return crop.flip(2) if flip else crop


def decode_center(path, size, resize):
    """An evaluation image: torchvision's Resize(resize) + CenterCrop(size) (on the PIL image, as its
    ImageNet reference evaluates) of the decoded file, uint8."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    image = Image.fromarray(decode_rgb(path).permute(1, 2, 0).numpy())
    image = np.array(TF.center_crop(TF.resize(image, resize), size))
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def read_image_sizes(paths, workers):
    """(N, 2) int64 heights and widths from the files' headers (no decoding), in worker processes; one
    line naming the first file that is not an image Pillow can open."""
    loader = torch.utils.data.DataLoader(ImageHeaders(paths), batch_size=256, num_workers=workers,
                                         collate_fn=list, worker_init_fn=leave_stops_to_main)
    sizes, chunks = [], None
    try:
        with stop_signals_held():
            chunks = iter(loader)  # starts the workers
        for chunk in chunks:
            for path, size in chunk:
                if isinstance(size, str):
                    raise SystemExit(f"error: cannot read {path} ({size}); replace or delete it: a run does "
                                     "not skip images")
                sizes.append(size)
    finally:
        del chunks  # the workers stop now (the iterator's end), also when the loop stops early
    return torch.tensor(sizes, dtype=torch.long).view(-1, 2)


class ImageHeaders(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as img:
                check_pixel_depth(img)
                return str(self.paths[i]), (img.height, img.width)
        except Exception as error:
            return str(self.paths[i]), unreadable_reason(Path(self.paths[i]), error)


def load_streamed_folder(args, size, device, listing=None):
    """--dataset imagenet (DIR/train/<wnid>/, DIR/val/<wnid>/) or a folder streamed (--pipeline stream): the
    files listed (`listing`: list_image_folder's result, when listed already) and their headers read before
    training, a fingerprint of their names, byte sizes and image sizes."""
    splits = ("train", "val") if args.dataset == "imagenet" else ("train", "test")
    root = Path(args.data_dir).expanduser()
    eval_resize = args.eval_resize or round(size * 256 / 224)
    if eval_resize < size:  # torchvision's CenterCrop would pad the resized image with black
        raise SystemExit(f"error: --eval-resize {eval_resize} is smaller than --image-size {size}: the "
                         f"center crop would be mostly padding; use at least {size} (default: "
                         f"{round(size * 256 / 224)}, torchvision's 256/224)")
    classes, listed = listing or list_image_folder(root, splits)
    workers = default_workers(args)
    sizes = [read_image_sizes(paths, workers) for paths, _ in listed.values()]
    digest = hashlib.sha1()
    for (paths, labels), split_sizes in zip(listed.values(), sizes):
        for path, label, (h, w) in zip(paths, labels, split_sizes.tolist()):
            digest.update(f"{path.relative_to(root)}\t{label}\t{path.stat().st_size}\t{h}\t{w}\n".encode())
    mean, std = IMAGENET_NORMALIZATION
    return StreamedData(args.dataset, [(paths, labels) for paths, labels in listed.values()], sizes,
                        len(classes), size, eval_resize, workers, args.crop_scale, args.crop_ratio, mean, std,
                        device, digest.hexdigest()[:16])


def default_workers(args):
    """--workers, else the CPU cores this process may use, less one for the training process, at most 16."""
    if args.workers is not None:
        return args.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's ranks on this machine share them
    return max(0, min(16, cores // per_node - 1))


# ------------------------------------------------------------------------------------------------- teachers

STANDARD_TEACHER_EPOCHS = 240

def teacher_path(args, data, name, epochs=STANDARD_TEACHER_EPOCHS, weights=None):
    """Where a teacher of this data is cached: checkpoints/<data>/<name>.pth for the standard 240 epochs,
    <name>_<E>ep.pth for E others (see dataset_tag), so that a short smoke-run teacher is never taken for
    it; <name>-<WEIGHTS>... for one fine-tuned from torchvision's WEIGHTS, never taken for one trained from
    scratch."""
    start = "" if weights is None else f"-{weights}"
    suffix = "" if epochs == STANDARD_TEACHER_EPOCHS else f"_{epochs}ep"
    return Path(args.checkpoint_dir) / dataset_tag(args, data) / f"{name}{start}{suffix}.pth"


def teacher_candidates(args, data):
    root = Path(args.checkpoint_dir)
    weights = getattr(args, "teacher_weights", None)
    paths = [teacher_path(args, data, args.teacher, args.teacher_epochs, weights)]
    standard = args.teacher_epochs == STANDARD_TEACHER_EPOCHS and not weights
    if args.dataset == "cifar100" and not args.train_subset and standard:
        paths += [root / f"{args.teacher}_vanilla" / "ckpt_epoch_240.pth",  # the public benchmark layout
                  root / "cifar_teachers" / f"{args.teacher}_vanilla" / "ckpt_epoch_240.pth"]
    return paths


def train_teacher(args, data, teacher, target):
    """Train a missing teacher with its family's standard recipe for --teacher-epochs into `target`: from
    scratch, or fine-tuned from torchvision's --teacher-weights with a new head."""
    weights = getattr(args, "teacher_weights", None)
    how = f"fine-tuning torchvision's {weights} weights" if weights else "training it"
    log(f"no {args.teacher} teacher checkpoint of {args.teacher_epochs} epochs for {dataset_tag(args, data)} "
        f"(looked for {', '.join(map(str, teacher_candidates(args, data)))}); {how} first with the "
        f"standard {model_family(args.teacher)} recipe -> {target}")
    recipe = make_recipe(args, model_family(args.teacher), epochs=args.teacher_epochs, use_overrides=False,
                         model_name=args.teacher)
    torch.manual_seed(args.seed)
    device = data.device
    if weights:  # the seeded new head comes first, as in common.py --pretrained
        state = torchvision_weights(args.teacher, weights)[0]
        initial = start_from_weights(args.teacher, state, data.num_classes, device)
        teacher.load_state_dict(initial.state_dict())
    # A killed teacher run continues (resume=True); one of another start, length or seed has its own folder.
    start = f"-{weights}" if weights else ""
    run_dir = target.parent / f"{args.teacher}{start}_run_{args.teacher_epochs}ep_seed{args.seed}"
    config = {"model": args.teacher, "epochs": args.teacher_epochs, "seed": args.seed,
              "dataset": args.dataset, "train_subset": args.train_subset,
              **({"pretrained": weights} if weights else {})}
    fit(teacher, data, run_dir, recipe, seed=args.seed, resume=True, fast=fast_paths(args, device),
        eval_every=args.eval_every, log_every=args.log_every, title=f"teacher {args.teacher}", config=config)
    on_rank_0(place_teacher, run_dir / "model.pth", target, False, True)  # all ranks trained; rank 0 wrote


def claim_teacher(path, wait, replace=False):
    """One process at a time makes (trains, fine-tunes or saves) the teacher cached at `path`: it holds an OS
    lock on the hidden .<name>.lock beside it until the teacher is in place (place_teacher) or it exits.
    Another holder is waited for with wait (saying so), else refused in one line. Returns whether the teacher
    is still to be made: False when another process made it meanwhile (unless it is to be replaced)."""
    ensure_writable(path.parent, "--checkpoint-dir")
    lock = FileLock(path.with_name(f".{path.name}.lock"))
    if not lock.acquire():
        busy = f"another process is making the teacher {path} (it holds {lock.path})"
        if not wait:
            raise SystemExit(f"error: {busy}; run this again once it is done (a method run then uses it)")
        log(f"{busy}; waiting for it to finish (Ctrl-C stops this run)")
        lock.acquire(wait=True)
    if path.exists() and not replace:
        lock.release()
        log(f"the teacher {path} was made by another process meanwhile: this run uses it")
        return False
    teacher_claims[path] = lock
    return True


teacher_claims = {}  # path of a teacher this process is making -> its FileLock


def place_teacher(source, target, replace, move=False):
    """The teacher made in `source` (a model.pth) put in the cache at `target` (moved there with move, else
    copied), claimed by this process (claim_teacher), which then lets go of the claim. A teacher already
    there is replaced only with `replace`, and then with a line saying so."""
    target = Path(target)
    if target.exists() and not replace:
        raise SystemExit(f"error: {target} appeared while this run made its teacher; nothing was replaced. "
                         f"The teacher made here is {source}")
    replaced = target.exists()
    try:
        os.replace(source, target) if move else write_atomic(target, Path(source).read_bytes())
    except OSError as error:
        raise SystemExit(f"error: cannot move {source} to {target} ({error.strerror or error})") from None
    if replaced:
        log(f"replaced the earlier teacher {target}")
    lock = teacher_claims.pop(target, None)
    if lock:
        lock.release()


def keep_teacher_copy(source, copy):
    """The run's own copy of its teacher's file, so that a resume reads the teacher it was distilled from,
    whatever the shared cache holds by then: a hard link where the file system allows (no space taken; the
    cache replaces files through a rename, which leaves the link's content as it was), else a copy."""
    source, copy = Path(source), Path(copy)
    if copy.exists() and copy.samefile(source):
        return
    tmp = copy.with_name(copy.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, copy)
    except OSError:  # another file system, or links not allowed
        tmp.unlink(missing_ok=True)
        write_atomic(copy, source.read_bytes())


def teacher_source(args, data):
    """Where the run's teacher comes from, decided in one place from the flags and the disk as rank 0 sees
    it: ("run", path) for the run's own copy, when it is resumed (from the cache: a --teacher-ckpt given is
    read, and checked against the run's teacher, see run_identity); ("torchvision", None) for torchvision's
    --teacher-weights as they are (data of 1000 classes); ("file", path) for --teacher-ckpt or a teacher
    found in the cache; ("train", path) for one that is trained (or fine-tuned) first and cached at path."""
    weights = getattr(args, "teacher_weights", None)
    if weights and args.teacher_ckpt:
        raise SystemExit("error: --teacher-weights and --teacher-ckpt each give the teacher; pass one")
    copy = run_teacher_copy(args)
    if getattr(args, "resume", False) and copy and not args.teacher_ckpt and from_rank_0(copy.is_file()):
        return "run", copy
    if weights and data.num_classes == 1000:
        return "torchvision", None
    if args.teacher_ckpt:
        return "file", Path(args.teacher_ckpt)
    candidates = teacher_candidates(args, data)
    found = from_rank_0(next((p for p in candidates if p.exists()), None))
    return ("file", found) if found else ("train", candidates[0])


def load_teacher(args, data):
    """The frozen teacher in eval mode (see teacher_source): from --teacher-ckpt, else from checkpoints/,
    else trained first; with --teacher-weights, torchvision's weights themselves for ImageNet's 1000 classes,
    fine-tuned from them (and cached) for other data. Its record (file, epochs, accuracy, data fingerprint,
    weights fingerprint) goes into summary.json."""
    device = data.device
    source, path = teacher_source(args, data)
    copy = run_teacher_copy(args)
    if source == "torchvision" or (source == "run" and data.num_classes == 1000 and args.teacher_weights):
        teacher = torchvision_teacher(args, data, copy if source == "run" else None)
        if copy and not (args.resume and copy.exists()):
            on_rank_0(keep_teacher_copy, teacher.source["file"], copy)
        return measured(frozen_teacher(teacher, args, device), data, args)
    teacher = build_model(args.teacher, data.num_classes, device)
    candidates = teacher_candidates(args, data)
    if source == "train" and on_rank_0(claim_teacher, path, world_size() == 1):
        train_teacher(args, data, teacher, path)
    if source == "run":
        return measured(frozen_teacher(run_teacher(args, teacher, path), args, device), data, args)
    checkpoint = load_weights(teacher, path)
    epochs, trained_on = checkpoint.get("epoch"), checkpoint.get("data")
    if trained_on and trained_on != data.fingerprint:
        if path == candidates[0]:  # our cache must hold this data's teacher
            raise SystemExit(f"error: {path} was trained on other data (fingerprint {trained_on}, this run's "
                             f"data {data.fingerprint}); move it away, or pass the teacher with "
                             "--teacher-ckpt")
        log(f"warning: teacher {path} was trained on other data than this run's (fingerprint {trained_on}, "
            f"this data {data.fingerprint}; a subset of its data, for example)")
    if not args.teacher_ckpt and epochs is not None and epochs != args.teacher_epochs:
        raise SystemExit(f"error: {path} holds a {epochs}-epoch teacher, not the {args.teacher_epochs}-epoch "
                         "one this run asks for (--teacher-epochs); move it away, pass --teacher-epochs "
                         f"{epochs}, or pass it with --teacher-ckpt")
    teacher.source = {"file": str(path), "epochs": epochs, "accuracy": checkpoint.get("accuracy"),
                      "data": trained_on}
    data_note = ("this run's data" if trained_on == data.fingerprint
                 else f"data {trained_on or 'not recorded'}")
    log(f"teacher {args.teacher} from {path} (epochs: {epochs or 'not recorded'}, accuracy: "
        f"{checkpoint.get('accuracy')}, trained on {data_note})")
    if copy and not (args.resume and copy.exists()):  # a resume never replaces the run's teacher
        on_rank_0(keep_teacher_copy, path, copy)
    return measured(frozen_teacher(teacher, args, device), data, args)


def run_teacher_copy(args):
    """Where a run keeps the copy of its teacher's file (None for a teacher loaded outside a run folder)."""
    return Path(args.out_dir) / RUN_TEACHER if getattr(args, "out_dir", None) else None


def run_teacher(args, teacher, copy):
    """A resumed run's teacher: the copy of the file it was distilled from, kept in its folder."""
    checkpoint = load_weights(teacher, copy)
    epochs, accuracy = checkpoint.get("epoch"), checkpoint.get("accuracy")
    teacher.source = {"file": str(copy), "epochs": epochs, "accuracy": accuracy,
                      "data": checkpoint.get("data")}
    log(f"teacher {args.teacher} from the run's own copy {copy} (epochs: {epochs or 'not recorded'}, "
        f"accuracy: {accuracy})")
    return teacher


def measured(teacher, data, args):
    """A teacher is measured before it teaches, however it was obtained: its accuracy on this run's test
    split, in one line and in its record (summary.json), with a plain warning when it is near chance (a
    wrong class order or normalisation, or a teacher trained too briefly)."""
    metrics = evaluate(data, default_eval(teacher), teacher, [], fast_paths(args, data.device))
    teacher.source.update(metrics)
    top5 = f", top-5 {metrics['test_top5']:.2f} %" if "test_top5" in metrics else ""
    log(f"teacher {teacher.arch} measured on this run's test split ({len(data.test_y)} images): top-1 "
        f"{metrics['test_acc']:.2f} %{top5}")
    chance = 100 / data.num_classes
    if metrics["test_acc"] < 2 * chance:
        log(f"warning: the teacher's top-1 accuracy {metrics['test_acc']:.2f} % is near chance "
            f"({chance:.3g} %): it has little to teach. Trained too briefly, or its classes or normalisation "
            "differ from this data's (torchvision's ImageNet weights expect the wnid folders, sorted)")
    return teacher


def frozen_teacher(teacher, args, device):
    """The teacher in the run's memory format, in eval mode, without trainable parameters."""
    if fast_paths(args, device).channels_last:
        teacher.to(memory_format=torch.channels_last)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def torchvision_teacher(args, data, run_copy=None):
    """--teacher-weights NAME on data of ImageNet's 1000 classes: torchvision's weights are the teacher, as
    they are (from the run's copy of their file on a resume). Their outputs are ImageNet's classes in the
    sorted order of the wnids: the class folders must be named so (checked), and --teacher-epochs has
    nothing to train (said)."""
    named = [name for name in data.classes or [] if not re.fullmatch(r"n\d{8}", name)]
    if data.classes is None or named:
        shown = f"{', '.join(named[:3])}{', ...' if len(named) > 3 else ''}" if named else "not named"
        raise SystemExit(f"error: torchvision's {args.teacher_weights} weights output ImageNet's classes in "
                         "the sorted order of their wnids (n01440764, n01443537, ...), but this data's 1000 "
                         f"classes are {shown}: name the class folders by their wnids, or train a teacher on "
                         "this data")
    state, record = torchvision_weights(args.teacher, args.teacher_weights, run_copy)
    teacher = start_from_weights(args.teacher, state, 1000, data.device)
    teacher.source = {"file": record["file"], "epochs": None, "accuracy": None,
                      "published_accuracy": record["accuracy"], "data": None}
    unused = (f"; --teacher-epochs {args.teacher_epochs} is not used: there is nothing to fine-tune"
              if args.teacher_epochs != STANDARD_TEACHER_EPOCHS else "")
    log(f"teacher {args.teacher}: torchvision's {args.teacher_weights} weights as they are (published "
        f"ImageNet top-1 {record['accuracy']}){unused}")
    return teacher


def torchvision_weights(name, weights_name, run_copy=None):
    """torchvision's `weights_name` weights (IMAGENET1K_V1, ...) of the ImageNet model `name` (tv_*), through
    its weights API: from the hub cache under TORCH_HOME, downloaded there when the network allows; one line
    naming the file and where to put it otherwise (run_copy: a resumed run's copy of that file instead).
    Returns (state_dict, {file, accuracy})."""
    import torchvision

    from models.imagenet import torchvision_classes

    if name not in TORCHVISION_MODELS:
        raise SystemExit(f"error: {name} has no torchvision weights; torchvision's models here: "
                         f"{', '.join(TORCHVISION_MODELS)}")
    source = torchvision_classes()[name][0]
    choices = torchvision.models.get_model_weights(source)
    if weights_name not in choices.__members__:
        raise SystemExit(f"error: torchvision has no {weights_name} weights for {source}; it has "
                         f"{', '.join(choices.__members__)}")
    weights = choices[weights_name]
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    accuracy = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    if run_copy is not None:
        return torch.load(run_copy, map_location="cpu", weights_only=True), {"file": str(run_copy),
                                                                             "accuracy": accuracy}
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as error:  # no network (URLError), a broken file, ...
        raise SystemExit(f"error: cannot load torchvision's {source} {weights_name} weights "
                         f"({type(error).__name__}); without a network, download {weights.url} elsewhere and "
                         f"put it at {target}") from None
    return state, {"file": str(target), "accuracy": accuracy}


def pretrained_weights(name, weights):
    """--pretrained: torchvision's weights of that name, or a file of the model's 1000-class ImageNet
    state_dict (a bare one or the benchmark format {'model': ...}), read as every weights file is
    (read_weights). Returns (state_dict, {file, accuracy})."""
    if name not in IMAGENET_MODELS:
        raise SystemExit(f"error: --pretrained starts an ImageNet model from its 1000-class weights, and "
                         f"{name} is a CIFAR model; pass a trained one to the methods with --teacher-ckpt")
    path = Path(weights).expanduser()
    if path.exists() or "/" in weights or path.suffix in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
        state, _ = read_weights(path, name, 1000)  # a path, not one of torchvision's weights names
        return state, {"file": str(weights), "accuracy": None}
    return torchvision_weights(name, weights)


def start_from_weights(name, state, num_classes, device):
    """Model `name` with ImageNet weights (strictly: torchvision's, or a file's), its 1000-class Linear
    replaced by a fresh one for num_classes other than 1000 (the fine-tuning start of the OFA/LFCC CIFAR
    protocol)."""
    from models.imagenet import replace_classifier

    model = create_model(name, 1000)
    model.load_state_dict(state, strict=True)
    if num_classes != 1000:
        replace_classifier(model, num_classes)
    return model.to(device)


def teacher_record(teacher):
    """The teacher of a run, for summary.json and the checkpoint's identity: its architecture, a fingerprint
    of its weights, and where load_teacher found it (file, epochs, accuracy, data fingerprint)."""
    weights = fingerprint(*teacher.state_dict().values())
    return {"arch": teacher.arch, "weights": weights, **getattr(teacher, "source", {})}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train one model alone with the standard recipe "
                                     "(teachers, plain-student baselines).")
    parser.add_argument("--model", choices=MODEL_NAMES, metavar="NAME",
                        help="architecture (required, except with --evaluate FILE when the file names it): "
                             + ", ".join(MODEL_NAMES))
    add_common_args(parser)
    parser.add_argument("--pretrained", nargs="?", const="IMAGENET1K_V1", metavar="WEIGHTS",
                        help="start a torchvision model (tv_*) from torchvision's weights of that name "
                             "(IMAGENET1K_V1 when left out; downloaded into TORCH_HOME when the network "
                             "allows), or any ImageNet model from a file of its 1000-class state_dict (e.g. "
                             "timm's weights for a timm_* model, same keys); a new head for another class "
                             "count")
    parser.add_argument("--save-as-teacher", action="store_true",
                        help="when done, also save the model where the method scripts look for a teacher of "
                             "this data: checkpoints/<data>/<model>.pth, or <model>_<E>ep.pth for --epochs E "
                             "other than 240, found by --teacher-epochs E (see --checkpoint-dir); with "
                             "--pretrained W, <model>-<W>..., found by --teacher-weights W")
    parser.add_argument("--evaluate", type=path_flag, metavar="FILE",
                        help="train nothing: print the top-1 and top-5 test accuracy of the model saved in "
                             "FILE (a model.pth, a teacher, a state_dict) on the data the flags describe")
    args = parser.parse_args(argv)
    if args.evaluate:
        return evaluate_file(args)
    if args.model is None:
        parser.error("the following arguments are required: --model")
    device, data = setup(args, "common", parser)
    start = args.pretrained and (Path(args.pretrained).stem if Path(args.pretrained).expanduser().is_file()
                                 else args.pretrained)  # what the teacher's file name says it started from
    teacher_file = teacher_path(args, data, args.model, args.epochs, start)
    if args.save_as_teacher:
        on_rank_0(claim_teacher_file, teacher_file, args.overwrite)
    if args.pretrained:
        state, record = pretrained_weights(args.model, args.pretrained)
        model = start_from_weights(args.model, state, data.num_classes, device)
        source = (f"torchvision's {args.pretrained} weights (ImageNet top-1 {record['accuracy']})"
                  if record["accuracy"] is not None else record["file"])
        log(f"{args.model} starts from {source}{', a new head' if data.num_classes != 1000 else ''}")
        if args.sync_bn and world_size() > 1:
            synchronise_batchnorm(model)
    else:
        model = build_model(args.model, data.num_classes, device, sync_bn=args.sync_bn)
    fit(model, data, args.out_dir, make_recipe(args, model_family(args.model), model_name=args.model),
        **run_options(args))
    if args.save_as_teacher:  # rank 0 wrote model.pth and copies it; the other ranks wait for it
        on_rank_0(place_teacher, Path(args.out_dir) / "model.pth", teacher_file, args.overwrite)
        log(f"saved as the {args.model} teacher of this data: {teacher_file}")


def claim_teacher_file(teacher_file, overwrite):
    """--save-as-teacher, before training: the teacher's place is free (or --overwrite), writable, and claimed
    by this run (claim_teacher), so that two runs never replace each other's teacher."""
    exists = f"error: {teacher_file} exists; move it away first, or add --overwrite to replace it"
    if teacher_file.exists() and not overwrite:
        raise SystemExit(exists)
    ensure_writable(teacher_file.parent, "--checkpoint-dir")
    if not claim_teacher(teacher_file, wait=False, replace=overwrite):  # made since the check above
        raise SystemExit(exists)


def evaluate_file(args):
    """common.py --evaluate FILE: the saved model's top-1 and top-5 accuracy on the test split of the data
    the flags describe, in one line; nothing is trained or written."""
    path = Path(args.evaluate).expanduser()
    if not path.is_file():
        raise SystemExit(f"error: --evaluate {path}: no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise SystemExit(f"error: {path} is not a readable PyTorch checkpoint ({type(error).__name__})") \
            from None
    state = saved.get("model", saved) if isinstance(saved, dict) else {}
    arch = args.model or saved.get("arch") or identify_architecture(state)
    if arch is None:
        raise SystemExit(f"error: {path} does not say which architecture it holds; pass --model NAME")
    args.model = arch
    device = torch.device(args.device)
    data = load_data(args, device)
    model = build_model(arch, data.num_classes, device)
    load_weights(model, path)
    fast = fast_paths(args, device)
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    metrics = evaluate(data, default_eval(model), model, [], fast)
    top5 = f", top-5 {metrics['test_top5']:.2f} %" if "test_top5" in metrics else ""
    trained_on = saved.get("data") if isinstance(saved, dict) else None
    note = "" if trained_on in (None, data.fingerprint) else \
        f" (the model's training data: {trained_on}; this data: {data.fingerprint})"
    log(f"{path}: {arch}, top-1 {metrics['test_acc']:.2f} %{top5} on the {len(data.test_y)} test images of "
        f"{dataset_tag(args, data)}{note}")
    return metrics


if __name__ == "__main__":
    run_main(main)

"""The training core the three method scripts share: data on the device, the recipes, the fast paths, the
training step and loop (`fit`), evaluation, and the entry points every script calls (the common flags,
`setup`, teacher loading, `main`). The bookkeeping around them (run folders and resumes, image files and the
streamed pipeline, torchrun, weight files, flags, stop lines) is in plumbing/, which a reader may skip.

Run alone it trains one model with the standard recipe (teachers and the plain-student baselines):

    python common.py --model resnet32x4                       # CIFAR-100, 240 epochs, SGD recipe
    python common.py --model resnet8 --dataset folder --data-dir ~/data/cifar10 --train-subset 5000 \\
        --epochs 20
    python common.py --model tv_swin_t --pretrained --dataset cifar100 --image-size 224 --epochs 30 \\
        --save-as-teacher                              # an ImageNet teacher fine-tuned (OFA-KD's protocol)
    python common.py --evaluate runs/.../model.pth --dataset cifar100   # top-1 and top-5 of a saved model

Where to look: the training step is `make_train_step` (forward and loss, backward, clipping, optimizer
step), the loop is `fit`, right below it; a method calls `fit` with its loss_fn, train_modules and eval_fn.

Data: the whole dataset is a uint8 tensor on the training device (`Data`); crop, flip and normalisation
run batched there, drawn from (seed, epoch), so that a resumed run sees the same batches. ImageNet, and
folders too large for the device, are streamed (plumbing/streaming.py) behind the same interface. Fast
paths (`fast_paths`, named in every run's first line): bf16 autocast, channels_last, torch.compile, fused
optimizers. Under `torchrun --nproc_per_node N`, --batch-size is the global batch, split over the ranks;
the trained modules and the loss go into DistributedDataParallel, the frozen teacher does not.
"""
import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import DEFAULT_LR, MODEL_NAMES, create_model, default_image_size, fixed_image_size, model_family
from plumbing.crops import resized_crop_boxes, resized_crops
from plumbing.datasets import (balanced_subset, check_subset, list_image_folder, load_cifar,
                               load_image_folder, make_synthetic)
from plumbing.distributed import (distributed_loss, init_distributed, on_rank_0, on_rank_0_first, rank,
                                  shard_bounds, sum_across_ranks, synchronise_batchnorm, test_batch_bounds,
                                  world_size)
from plumbing.files import ensure_writable
from plumbing.identity import dataset_tag, default_out_dir, fingerprint, run_identity
from plumbing.progress import ProgressLine, check_finite, log_epoch, log_start
from plumbing.runfolder import RunFolder, claim_out_dir
from plumbing.session import log, session
from plumbing.streaming import load_streamed_folder
from plumbing.validators import (area_fraction, device_name, fraction, nonnegative_float, nonnegative_int,
                                 path_flag, positive_float, positive_int, seed_int)
from plumbing.weights import (STANDARD_TEACHER_EPOCHS, claim_teacher, claim_teacher_file,
                              identify_architecture, keep_teacher_copy, load_weights, place_teacher,
                              pretrained_weights, run_teacher_copy, start_from_weights, teacher_candidates,
                              teacher_path, teacher_record, teacher_source, torchvision_teacher,
                              torchvision_weights)
# The method files import only common and models: what else they use of plumbing they find here.
from plumbing.files import save_atomic, save_json  # noqa: F401  (SSKD's summary and model files)
from plumbing.progress import run_main  # noqa: F401  (every script's __main__)
from plumbing.runfolder import model_file  # noqa: F401  (SSKD's model.pth)


# ----------------------------------------------------------------------------------------------------- data

NORMALIZATION = {  # the benchmark's per-channel mean and std
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


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

    def keep_test(self, keep):
        """Evaluate on the test images at indices `keep` only (--test-subset)."""
        keep = keep.to(self.device)
        self.test_x, self.test_y = self.test_x[keep], self.test_y[keep]

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

    @property
    def pipeline(self):
        """The pipeline in a few words, for the run's first line (StreamedData's says it streams)."""
        if self.augment == "pad-crop":
            return "on the device (pad-crop)"
        return f"on the device, kept at {self.stored_size}px, {self.augment} to {self.image_size}px"

    def normalize(self, x):
        """uint8 pixels, or float ones in 0..255 (a resized batch, modified in place), normalised."""
        return (x.float().div_(255) - self.mean) / self.std

    def train_batches(self, batch_size, seed, epoch, channels_last=False, shard=(0, 1)):
        """Shuffled, augmented, normalised batches: random crop after 4-pixel zero padding and horizontal
        flip, or a random resized crop and flip (self.augment). The randomness of an epoch depends only on
        (seed, epoch). Under torchrun, `shard` is (rank, world size): every rank draws the same epoch and
        takes its part of each global batch of `batch_size` (see shard_bounds), so that the ranks' parts
        together are exactly the single-process epoch."""
        n, size = len(self.train_y), self.image_size
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).to(self.device)
        if self.augment == "resized-crop":
            side = self.stored_size
            boxes = resized_crop_boxes(n, side, side, self.crop_scale, self.crop_ratio, g)
            boxes, flips = boxes.to(self.device), (torch.rand(n, generator=g) < 0.5).to(self.device)
            for start in range(0, n, batch_size):
                lo, hi = shard_bounds(start, min(start + batch_size, n), *shard)
                idx = order[lo:hi]
                x = self.normalize(self.train_x[idx])  # on the small images: see resized_crops
                x = resized_crops(x, boxes[lo:hi], size, flips[lo:hi], channels_last)
                yield x, self.train_y[idx]
            return
        offsets = torch.randint(0, 9, (n, 2), generator=g).to(self.device)
        flips = (torch.rand(n, generator=g) < 0.5).to(self.device)
        arange = torch.arange(size, device=self.device)
        for start in range(0, n, batch_size):
            lo, hi = shard_bounds(start, min(start + batch_size, n), *shard)
            idx = order[lo:hi]
            x = F.pad(self.train_x[idx], (4, 4, 4, 4))  # zero pixels, like the benchmark's padded PIL crop
            rows = (offsets[lo:hi, 0, None] + arange)[:, None, :, None]
            cols = (offsets[lo:hi, 1, None] + arange)[:, None, None, :]
            x = x[torch.arange(len(idx), device=x.device)[:, None, None, None],
                  torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
            x = torch.where(flips[lo:hi, None, None, None], x.flip(3), x)
            x = self.normalize(x)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            yield x, self.train_y[idx]

    def test_batches(self, batch_size=500, channels_last=False, shard=(0, 1)):
        """The test set in order, in global batches of `batch_size`, each rank its part of each (see
        test_batch_bounds: under torchrun no rank's part is empty)."""
        for lo, hi in test_batch_bounds(len(self.test_y), batch_size, shard):
            x = self.test_x[lo:hi]
            if self.stored_size != self.image_size:  # kept smaller (CIFAR at 224): the whole image resized
                x = F.interpolate(x.float(), size=self.image_size, mode="bilinear", align_corners=False)
            x = self.normalize(x)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            yield x, self.test_y[lo:hi]


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
        return keep_test_subset(args, data)
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
    return keep_test_subset(args, data).to(device)


def keep_test_subset(args, data):
    """--test-subset N: evaluate on a class-balanced N of the test images (the same for every seed). Taken
    after the data's fingerprint, which stays that of the whole data: a teacher trained by a run that
    evaluates on a subset learnt from the same images."""
    if getattr(args, "test_subset", 0):
        labels = data.test_y.cpu()
        check_subset(args, labels, data.num_classes, split="test")
        data.keep_test(balanced_subset(labels, args.test_subset, data.num_classes, seed=0, flag="--test-subset"))
    return data


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
    log_start(title or model.arch, recipe, steps_per_epoch, model, train_modules, device, describe(fast))

    for epoch in range(len(history), recipe["epochs"]):
        model.eval()  # what is not trained (a teacher, frozen stages) stays in eval mode
        for module in train_modules:
            module.train()
        progress_line = ProgressLine(epoch, recipe, steps_per_epoch, log_every, folder.checkpoint)
        loss_sum, term_sums, seen = torch.zeros((), device=device), {}, 0
        batches = data.train_batches(recipe["batch_size"], seed, epoch, fast.channels_last, shard)
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
        for x, y in data.test_batches(channels_last=fast.channels_last, shard=(rank(), world_size())):
            for name, value in eval_fn(x, y).items():
                sums[name] = sums.get(name, 0) + value.float() * len(y)
            n += len(y)
    totals = sum_across_ranks({**sums, "images": torch.tensor(float(n), device=data.device)})
    n = totals.pop("images").item()
    return {name: value.item() / n for name, value in totals.items()}


# ------------------------------------------------------------------- the entry points every script calls

def build_model(name, num_classes, device, sync_bn=False):
    """A fresh model on `device` (fit puts it in channels_last where the fast paths say so); with sync_bn,
    under torchrun, its BatchNorms synchronised across ranks (for a model that trains, never a teacher)."""
    model = create_model(name, num_classes).to(device)
    if sync_bn and world_size() > 1:
        synchronise_batchnorm(model)
    return model


def count_params(module):
    return sum(p.numel() for p in module.parameters())


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
    g.add_argument("--test-subset", type=nonnegative_int, default=0, metavar="N",
                   help="evaluate on a class-balanced subset of N test images (fixed choice), for quick "
                        "runs: its accuracies are not comparable with the whole test split's; it changes what "
                        "is measured, not what is learnt (default 0: the whole test split)")
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
    session.start()
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
    log(f"data: {data.name}, {len(data.train_y)} train / {len(data.test_y)} test images, {data.num_classes} "
        f"classes, {data.pipeline}, fingerprint {data.fingerprint}; output: {args.out_dir}")
    torch.manual_seed(args.seed)
    return device, data


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


# ------------------------------------------------------------------------------------------------- teachers

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


# ----------------------------------------------------------------------------------------------------- main

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

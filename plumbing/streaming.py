"""The streamed pipeline: an image folder too large for the device (ImageNet) decoded batch by batch in
DataLoader worker processes, from a plan drawn in the main process (the batches do not depend on the number
of workers); its headers read before training, one line for a file that fails, no worker left behind.
DataLoader is torch's; the per-(seed, epoch) plan and the rank shards are ours, so that N ranks and any
worker count equal one process."""
import atexit
import contextlib
import hashlib
import multiprocessing
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from plumbing.crops import resized_crop_boxes
from plumbing.datasets import (UnreadableFile, check_pixel_depth, list_image_folder, read_image,
                               unreadable_reason)
from plumbing.distributed import shard_bounds, test_batch_bounds


IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's


class StreamedData:
    """An image folder too large for the device, decoded batch by batch in DataLoader worker processes.

    The interface of common.Data, the device pipeline (labels, classes, fingerprint, image_size, device,
    pipeline, normalize, train_batches, test_batches), so that the loop reads either alike. Each epoch's
    plan (the order, every sample's crop box and flip) is drawn in the main process from (seed, epoch) and
    the image sizes read beforehand, so a batch does not depend on the number of workers, and a resumed run
    sees the same images in the same order. The workers only decode, crop, resize and flip, into uint8;
    conversion, normalisation and the memory format happen on the training device. Training: torchvision's
    RandomResizedCrop (resized_crop_boxes, --crop-scale, --crop-ratio) and a flip; evaluation: torchvision's
    Resize(R) + CenterCrop(S), R = --eval-resize (256 at 224), with torchvision's own functions."""

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

    @property
    def pipeline(self):
        """The pipeline in a few words, for the run's first line (as common.Data.pipeline)."""
        plural = "es" if self.workers > 1 else ""
        decoders = (f"{self.workers} worker process{plural} per rank" if self.workers
                    else "the training process")
        return (f"streamed, decoded by {decoders} (resized-crop to {self.image_size}px; test: resize "
                f"{self.eval_resize}, center crop)")

    def normalize(self, x):
        """uint8 pixels, normalised (as common.Data.normalize)."""
        return (x.float().div_(255) - self.mean) / self.std

    def subset(self, keep):
        self.train_paths = [self.train_paths[i] for i in keep.tolist()]
        self.train_sizes, self.train_y = self.train_sizes[keep], self.train_y[keep.to(self.train_y.device)]

    def keep_test(self, keep):
        """Evaluate on the test images at indices `keep` only (as common.Data.keep_test)."""
        self.test_paths = [self.test_paths[i] for i in keep.tolist()]
        self.test_sizes, self.test_y = self.test_sizes[keep], self.test_y[keep.to(self.test_y.device)]

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
        """The epoch's training batches, this rank's part of each (as common.Data.train_batches)."""
        return self.batches("train", self.train_plan(batch_size, seed, epoch, shard), channels_last)

    def test_batches(self, batch_size=500, channels_last=False, shard=(0, 1)):
        """The test set in order, this rank's part of each global batch (as common.Data.test_batches)."""
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
        image = torch.tensor(read_image(path, size=None)).permute(2, 0, 1)  # (a copy: the array is read-only)
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

"""Where the images come from: CIFAR's files as torchvision keeps them (a damaged download named as such),
image folders listed whole (every file read or counted) and read into RGB uint8 (one line for an unreadable
file), generated images for smoke runs, and the class-balanced training subset."""
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from plumbing.session import log


def load_cifar(name, data_dir):
    """torchvision's CIFAR-10 or CIFAR-100 files in data_dir (downloaded there when the network allows):
    ([train images, labels, test images, labels], classes), the images uint8 (N, 3, 32, 32)."""
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


def balanced_subset(labels, size, num_classes, seed, flag="--train-subset"):
    """Indices of `size` samples, size // num_classes from every class, chosen with a fixed seed."""
    per_class = size // num_classes
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < per_class:
            raise SystemExit(f"error: {flag} {size} needs {per_class} images of class {c}, it has "
                             f"{len(idx)}")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks).sort().values


def check_subset(args, labels, num_classes, split="train"):
    """--train-subset N (or --test-subset N, split "test"): at most the split's images, at least one per
    class, a multiple of the classes."""
    size, flag = getattr(args, f"{split}_subset"), f"--{split}-subset"
    if size > len(labels):
        raise SystemExit(f"error: {flag} {size} is more than the {len(labels)} "
                         f"{'training' if split == 'train' else 'test'} images of {args.dataset}")
    if size < num_classes:
        raise SystemExit(f"error: {flag} {size} is fewer than the {num_classes} classes of {args.dataset}: "
                         "a class-balanced subset needs one image per class at least")
    if size % num_classes:
        lower = size // num_classes * num_classes
        raise SystemExit(f"error: {flag} {size} does not split evenly over the {num_classes} classes of "
                         f"{args.dataset}: use a multiple of {num_classes}, e.g. {lower} or "
                         f"{lower + num_classes}")

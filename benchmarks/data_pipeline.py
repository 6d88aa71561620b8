"""The data pipelines of issue 23, on one CPU core: images/s of

1. the streamed image-folder pipeline (plumbing/streaming.py: the epoch's crop boxes drawn up front, each
   worker decoding a JPEG with torchvision.io into a uint8 tensor, resizing its box to 224 x 224 with
   torch's antialiased bilinear uint8 kernel and flipping it) against the KD anchors' ImageNet pipeline (mdistiller dataset/imagenet.py: torchvision ImageFolder, PIL
   RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize, float32 out), both in the
   measuring process (num_workers=0, so that images/s is per core), on a generated ImageNet-like folder:
   the CIFAR-10 photographs of --cifar-dir upsampled to ImageNet's typical sizes (shorter side 333-500,
   aspect 3/4-4/3) and saved as JPEG (quality 90). Variants name what makes the difference: ours with
   Pillow's decode and resize instead (the box resized by Image.resize), the anchors' transform without
   ToTensor + Normalize (uint8 out).
2. the device-side 224-px augmentation of the CIFAR protocol (common.Data.train_batches on 32 x 32 uint8 images
   kept as they are: every sample's RandomResizedCrop box drawn at once, the 32 x 32 images normalised,
   then two batched matrix products per batch into channels_last) against a per-image PIL pipeline that upsamples and crops (OFA-KD's CIFAR-100
   transform: RandomResizedCrop(224) + flip + ToTensor + Normalize on each 32 x 32 PIL image).

    taskset -c 0 python benchmarks/data_pipeline.py --cifar-dir ~/data/cifar10 --images 1000   # --parts 1 or 2
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from plumbing import datasets, streaming  # noqa: E402

MEAN, STD = streaming.IMAGENET_NORMALIZATION


def make_imagenet_like(cifar_dir, out, count):
    """`count` CIFAR-10 training photographs, upsampled bicubically to ImageNet-like sizes, as JPEGs in
    out/train/<class>/ and (a few) out/val/<class>/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    classes = sorted(p.name for p in (Path(cifar_dir).expanduser() / "train").iterdir() if p.is_dir())
    for split, n in (("train", count), ("val", len(classes))):
        for i in range(n):
            cls = classes[i % len(classes)]
            source = sorted((Path(cifar_dir).expanduser() / "train" / cls).iterdir())[i // len(classes)]
            short, aspect = int(rng.integers(333, 501)), float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            size = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            with Image.open(source) as img:
                img.convert("RGB").resize(size, Image.BICUBIC).save(folder / f"{i:05d}.JPEG", quality=90)


def rate(batches, count):
    start = time.perf_counter()
    seen = sum(len(y) for _, y in batches)
    assert seen == count
    return seen / (time.perf_counter() - start)


def streamed_rate(root, count, pillow=False):
    args = argparse.Namespace(dataset="imagenet", data_dir=str(root), workers=0, eval_resize=None,
                              crop_scale=[0.08, 1.0], crop_ratio=[3 / 4, 4 / 3])
    data = streaming.load_streamed_folder(args, 224, torch.device("cpu"))
    original = streaming.decode_crop
    streaming.decode_crop = pillow_crop if pillow else original  # the workers are this process (workers=0)
    plan = data.train_plan(64, seed=0, epoch=0, shard=(0, 1))
    loader = torch.utils.data.DataLoader(streaming.DecodedImages(data.train_paths, ("train", 224)),
                                         batch_sampler=plan, num_workers=0, collate_fn=streaming.collate_decoded)
    result = rate(((x, torch.zeros(len(x))) for x, _ in loader), count)
    streaming.decode_crop = original
    return result


def pillow_crop(path, box, size, flip):
    """decode_crop through Pillow: decode, the box resized by Image.resize (antialiased bilinear), flip."""
    from PIL import Image

    top, left, h, w = box
    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def anchor_rate(root, count, to_float=True):
    import torchvision
    import torchvision.transforms as T

    steps = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(MEAN, STD)] if to_float else [T.PILToTensor()]
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), T.Compose(steps))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=0)
    return rate(loader, count)


def device_side_rate(images, batch_size=128):
    n = len(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    data = common.Data(x, torch.zeros(n, dtype=torch.long), x[:1], torch.zeros(1, dtype=torch.long), 10,
                       (0.5,) * 3, (0.25,) * 3, "cifar", image_size=224)
    return rate(data.train_batches(batch_size, seed=0, epoch=0, channels_last=True), n)


def output_write_rate(n, batch_size=128):
    """The bound of any augmentation that produces float32 224-px batches: only writing them."""
    start = time.perf_counter()
    for _ in range(0, n, batch_size):
        torch.empty(batch_size, 224, 224, 3).fill_(0.5)
    return n / (time.perf_counter() - start)


def pil_upsampling_rate(images):
    import torchvision.transforms as T
    from PIL import Image

    transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize((0.5,) * 3, (0.25,) * 3)])
    start = time.perf_counter()
    for start_index in range(0, len(images), 128):
        torch.stack([transform(Image.fromarray(image)) for image in images[start_index:start_index + 128]])
    return len(images) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar-dir", required=True, help="CIFAR-10 as an image folder (train/<class>/)")
    parser.add_argument("--images", type=int, default=1000, help="JPEGs to generate and stream (default 1000)")
    parser.add_argument("--cifar-images", type=int, default=2048, help="32x32 images for part 2 (default 2048)")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="which (default both)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, {args.images} JPEGs", flush=True)
    if 1 in args.parts:
        streamed_vs_anchors(args)
    if 2 in args.parts:
        device_side_vs_pil(args)


def streamed_vs_anchors(args):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_imagenet_like(args.cifar_dir, root, args.images)
        streamed_rate(root, args.images)  # a first pass fills the page cache for both pipelines
        rows = [("streamed (ours): torchvision.io decode, torch uint8 resize of the box, flip",
                 streamed_rate(root, args.images)),
                ("ours with Pillow's decode and resize", streamed_rate(root, args.images, pillow=True)),
                ("anchors: ImageFolder, RandomResizedCrop, flip, ToTensor, Normalize", anchor_rate(root, args.images)),
                ("anchors' transform to uint8 (no ToTensor, Normalize)", anchor_rate(root, args.images, False))]
    print("\n| pipeline (one core, ImageNet-like JPEGs, 224 px) | images/s |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:,.0f} |")
    print(f"\nstreamed / anchors: {rows[0][1] / rows[2][1]:.2f}x")


def device_side_vs_pil(args):
    files = sorted((Path(args.cifar_dir).expanduser() / "train").rglob("*.jpg"))[:args.cifar_images]
    images = np.stack([datasets.read_image(path, 32) for path in files])
    ours, theirs, bound = device_side_rate(images), pil_upsampling_rate(images), output_write_rate(len(images))
    print("\n| CIFAR 32 -> 224 augmentation (one thread) | images/s |\n|---|---|")
    print(f"| device-side (ours, on the CPU): batched RandomResizedCrop + flip + normalise | {ours:,.0f} |")
    print(f"| per-image PIL: RandomResizedCrop(224) + flip + ToTensor + Normalize | {theirs:,.0f} |")
    print(f"| only writing the float32 batches (torch.empty + fill_): the bound of either | {bound:,.0f} |")
    print(f"\ndevice-side / PIL: {ours / theirs:.1f}x")


if __name__ == "__main__":
    main()

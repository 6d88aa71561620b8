"""Training throughput of every method, our pipeline against the benchmark codebases' pipeline, in one run.

Each method's training step is built from the method script's own functions (the loss the script trains
with, the modules it trains) and run on random images (speed does not depend on the pixels):

    teacher     the teacher trained alone with its recipe (cross-entropy)
    kd          plain KD, blockwise_kd.py --stones none --gamma 0 --alpha 0.1 --beta 0.9
    blockkd     Block-KD with all stepping-stones (blockwise_kd.py defaults)
    sskd_stage  SSKD phase A for the last stage (the costliest: both backbones run to stage 3)
    sskd_head   SSKD phase B (frozen backbone, head on labels)
    lfcc        LFCC (lfcc.py defaults)

Variants of the pipeline:

    reference   what RepDistiller/mdistiller do: a torchvision DataLoader over PIL images (RandomCrop(32, 4),
                RandomHorizontalFlip, ToTensor, Normalize) in --workers processes, fp32, contiguous memory,
                eager, the non-fused optimizer; the same loss and modules as ours
    ours        common.Data.train_batches + common.make_train_step with the device's default fast paths
    ours+OPT    the same with OPT changed (several joined by '+'): compile (torch.compile, default mode), graphs
                (torch.compile mode reduce-overhead: CUDA graphs), cl / nocl (channels_last on/off), bf16 / fp32
                (autocast on/off)

Reported: images/s over --steps timed steps after --warmup untimed ones (compilation happens there; its
seconds are shown), peak GPU memory, and the minutes 240 epochs of 50,000 images would take at that speed
(training steps only, no evaluation).

    python benchmarks/throughput.py --device cpu --teacher resnet20 --student resnet8 --methods kd blockkd
    python benchmarks/throughput.py --device cuda --teacher resnet32x4 --student resnet8x4 --workers 8 \\
        --variants reference ours ours+compile
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import blockwise_kd  # noqa: E402
import common  # noqa: E402
import lfcc  # noqa: E402
import sskd  # noqa: E402
from models import create_model, feature_shapes, model_family  # noqa: E402

METHODS = ["teacher", "kd", "blockkd", "sskd_stage", "sskd_head", "lfcc"]


class PILImages(torch.utils.data.Dataset):
    """Like torchvision's CIFAR dataset: numpy HWC uint8 -> PIL image -> transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def method_args(module, argv):
    """A method script's flags with their defaults, as its main() would parse them."""
    parser = argparse.ArgumentParser()
    common.add_common_args(parser)
    common.add_distill_args(parser)
    if module is not None:
        module.add_args(parser)
    return parser.parse_args(argv)


def frozen_teacher(name, num_classes, device, channels_last):
    """As common.load_teacher leaves it: eval mode, no trainable parameter, in the run's memory format."""
    teacher = create_model(name, num_classes).to(device).eval()
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def build_method(method, teacher_name, student_name, num_classes, device, channels_last, image_size=32):
    """(model, train_modules, loss_fn, recipe, teacher) for one method, built with the method script's
    functions, its shapes probed at image_size; Block-KD takes every stage, SSKD's stage phase is the last
    stage's."""
    torch.manual_seed(0)
    if method == "teacher":
        model = create_model(teacher_name, num_classes).to(device)
        recipe = common.make_recipe(method_args(None, []), model_family(teacher_name), model_name=teacher_name)
        return model, [model], common.classification_loss(model, recipe["label_smoothing"]), recipe, None

    teacher = frozen_teacher(teacher_name, num_classes, device, channels_last)
    student = create_model(student_name, num_classes).to(device)
    recipe = common.make_recipe(method_args(None, []), model_family(student_name), model_name=student_name)
    if method in ("kd", "blockkd"):
        argv = ["--stones", "none", "--gamma", "0", "--alpha", "0.1", "--beta", "0.9"] if method == "kd" else []
        args = method_args(blockwise_kd, argv)
        stones = blockwise_kd.parse_stones(args.stones, len(teacher.stages()))
        stepping_stones = blockwise_kd.SteppingStones(teacher, student, stones, image_size=image_size).to(device)
        loss_fn = blockwise_kd.make_loss_fn(student, teacher, stepping_stones, args,
                                            blockwise_kd.resolve_ramp_epochs(args, stones), recipe["label_smoothing"])
        return student, [student, stepping_stones], loss_fn, recipe, teacher
    if method == "sskd_stage":
        args = method_args(sskd, [])
        last = len(student.stages()) - 1
        shapes = feature_shapes(student, image_size)[last], feature_shapes(teacher, image_size)[last]
        adapters = {last: sskd.make_adapter(*shapes).to(device)}
        train_modules = [student.stages()[last], adapters[last]]
        sskd.set_trainable(student, train_modules)
        loss_fn = sskd.make_backbone_loss_fn(student, teacher, adapters, [last], args.feat_weight)
        return student, train_modules, loss_fn, recipe, teacher
    if method == "sskd_head":
        head = student.head()
        sskd.set_trainable(student, [head])
        return student, [head], sskd.make_head_loss_fn(student, False, recipe["label_smoothing"]), recipe, teacher
    if method == "lfcc":
        stages = list(range(1, min(len(student.stages()), len(teacher.stages())) + 1))
        args = method_args(lfcc, ["--stages", *map(str, stages)])
        low_pass = lfcc.make_filter(args)
        space = lfcc.make_compact_space(student, teacher, args.stages, low_pass, args.proj_dim,
                                        args.reduce_channels, image_size).to(device)
        loss_fn = lfcc.make_loss_fn(args, recipe, student, teacher, space, low_pass)
        return student, [student, space], loss_fn, recipe, teacher
    raise ValueError(method)


def parse_variant(variant, device):
    """'ours+compile+nocl' -> the fast-path Namespace common.fast_paths gives for those flags."""
    flags = argparse.Namespace(amp=None, channels_last=None, compile=None)
    for option in variant.split("+")[1:]:
        if option in ("compile", "graphs"):
            flags.compile = "default" if option == "compile" else "reduce-overhead"
        elif option in ("cl", "nocl"):
            flags.channels_last = option == "cl"
        elif option in ("bf16", "fp32"):
            flags.amp = "bf16" if option == "bf16" else "off"
        else:
            raise SystemExit(f"error: unknown variant option {option!r} in {variant!r}")
    return common.fast_paths(flags, device)


def measure(method, variant, args, device, images, labels):
    if variant == "reference":
        fast = argparse.Namespace(amp=False, channels_last=False, compile=None, fused=False)
    else:
        fast = parse_variant(variant, device)
    model, train_modules, loss_fn, recipe, _ = build_method(method, args.teacher, args.student, 100, device,
                                                            fast.channels_last, args.image_size)
    batch_size = args.batch_size or recipe["batch_size"]
    mean, std = common.NORMALIZATION["cifar100"]
    if variant == "reference":
        import torchvision.transforms as T
        transform = T.Compose([T.RandomCrop(args.image_size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(mean, std)])
        loader = torch.utils.data.DataLoader(PILImages(images, labels, transform), batch_size, shuffle=True,
                                             num_workers=args.workers, pin_memory=device.type == "cuda",
                                             drop_last=True)
        batches = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)
    else:
        data = common.Data(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                           torch.zeros(0, 3, args.image_size, args.image_size, dtype=torch.uint8),
                           torch.zeros(0, dtype=torch.long),
                           100, mean, std, "random").to(device)
        batches = data.train_batches(batch_size, seed=0, epoch=0, channels_last=fast.channels_last)
    _, step = common.prepare_training(model, train_modules, loss_fn, recipe, fast, device)
    model.eval()
    for module in train_modules:
        module.train()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        if i == args.warmup:
            sync()
            warmup_seconds, start = time.perf_counter() - start, time.perf_counter()
        if i == args.warmup + args.steps:
            break
        loss, _ = step(x, y, i / 1000, recipe["lr"])
    sync()
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise SystemExit(f"error: {method} {variant}: non-finite loss")
    if args.profile:
        profile(method, variant, step, batches, args.profile, recipe["lr"], device)
    images_per_sec = args.steps * batch_size / seconds
    return {"method": method, "variant": variant, "batch": batch_size, "images_per_sec": images_per_sec,
            "warmup_seconds": warmup_seconds,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            "minutes_240": 240 * 50_000 / images_per_sec / 60}


def profile(method, variant, step, batches, steps, lr, device):
    """Where a step's time goes: the top operators, and the device's busy time against the wall time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    torch.cuda.synchronize() if device.type == "cuda" else None
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _, (x, y) in zip(range(steps), batches):
            step(x, y, 0.5, lr)
        torch.cuda.synchronize() if device.type == "cuda" else None
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {method} {variant}, {steps} steps:")
    print(events.table(sort_by=sort, row_limit=12, max_name_column_width=50))
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_ms = sum(e.device_time for e in kernels) / 1e3 / steps
        print(f"per step: wall {wall_ms:.2f} ms (profiled), GPU busy {busy_ms:.2f} ms, "
              f"{len(kernels) / steps:.0f} kernels\n", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet32x4", help="teacher architecture (default resnet32x4)")
    parser.add_argument("--student", default="resnet8x4", help="student architecture (default resnet8x4)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to time (default all)")
    parser.add_argument("--variants", nargs="+", default=["reference", "ours"],
                        help="pipelines: reference, ours, ours+OPT[+OPT] with OPT in compile, graphs, cl, nocl, bf16, fp32")
    parser.add_argument("--batch-size", type=int, help="batch size (default: the student family's recipe)")
    parser.add_argument("--image-size", type=int,
                        help="input side (default: the models' own, 32 for the CIFAR zoo, 224 for ImageNet's)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference pipeline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after each measurement, profile this many more steps and print where the time goes")
    args = parser.parse_args()
    args.image_size = args.image_size or common.image_size_of(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    n = (args.steps + args.warmup + args.profile + 2) * max(args.batch_size or 0, 128)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, args.image_size, args.image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, n)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.teacher} -> {args.student}, {name}, torch {torch.__version__}, {args.steps} timed steps after "
          f"{args.warmup}", flush=True)
    print("| method | pipeline | batch | images/s | vs reference | warm-up s | peak MiB | 240 epochs (min) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for method in args.methods:
        reference = None
        for variant in args.variants:
            r = measure(method, variant, args, device, images, labels)
            reference = r["images_per_sec"] if variant == "reference" else reference
            ratio = f"{r['images_per_sec'] / reference:.2f}x" if reference else "-"
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
            print(f"| {method} | {variant} | {r['batch']} | {r['images_per_sec']:.0f} | {ratio} | "
                  f"{r['warmup_seconds']:.1f} | {peak} | {r['minutes_240']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

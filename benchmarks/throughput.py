"""Training throughput of plain KD: our pipeline against the benchmark codebases' pipeline, in one run.

ours:      the uint8 dataset on the device, crop/flip/normalise batched there (common.train_batches),
           bf16 autocast + channels_last on CUDA, fp32 on CPU.
reference: what RepDistiller/mdistiller do: a torchvision DataLoader over PIL images with RandomCrop(32, 4),
           RandomHorizontalFlip, ToTensor, Normalize in worker processes, fp32.
Same teacher, student, batch size and KD step (teacher forward under no_grad, student forward/backward,
SGD step), on random images (throughput does not depend on the pixels). Prints images/s and the ratio.

    python benchmarks/throughput.py --teacher resnet32x4 --student resnet8x4 --device cpu
    python benchmarks/throughput.py --teacher resnet32x4 --student resnet8x4 --device cuda --workers 8
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from models import create_model  # noqa: E402


class PILImages(torch.utils.data.Dataset):
    """Like torchvision's CIFAR dataset: numpy HWC uint8 -> PIL image -> transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def kd_step(teacher, student, optimizer, x, y, autocast):
    with autocast:
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits = student(x)
        kl = F.kl_div(F.log_softmax(logits.float() / 4, 1), F.softmax(teacher_logits.float() / 4, 1),
                      reduction="batchmean") * 16
        loss = 0.1 * F.cross_entropy(logits.float(), y) + 0.9 * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def measure(batches, step, warmup, steps, batch_size, device):
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        if i == warmup + steps:
            break
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet32x4", help="teacher architecture")
    parser.add_argument("--student", default="resnet8x4", help="student architecture")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (the benchmark's 64)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per pipeline")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference pipeline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile our student and teacher")
    args = parser.parse_args()
    device = torch.device(args.device)
    n = (args.steps + args.warmup + 1) * args.batch_size
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n)
    mean, std = common.NORMALIZATION["cifar100"]
    results = {}
    for pipeline in ("reference", "ours"):
        torch.manual_seed(0)
        teacher = create_model(args.teacher, 100).to(device).eval()
        student = create_model(args.student, 100).to(device).train()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        if pipeline == "reference":
            import torchvision.transforms as T
            transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                   T.Normalize(mean, std)])
            batches = torch.utils.data.DataLoader(PILImages(images, labels, transform), args.batch_size,
                                                  shuffle=True, num_workers=args.workers,
                                                  pin_memory=device.type == "cuda", persistent_workers=False)
            autocast = torch.autocast(device.type, enabled=False)
        else:
            data = common.Data(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                               torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                               100, mean, std, "random").to(device)
            channels_last = device.type == "cuda"
            if channels_last:
                teacher.to(memory_format=torch.channels_last)
                student.to(memory_format=torch.channels_last)
            if args.compile:
                teacher, student = torch.compile(teacher), torch.compile(student)
            batches = common.train_batches(data, args.batch_size, seed=0, epoch=0, channels_last=channels_last)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        step = lambda x, y: kd_step(teacher, student, optimizer, x, y, autocast)  # noqa: E731
        results[pipeline] = measure(batches, step, args.warmup, args.steps, args.batch_size, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"plain KD {args.teacher} -> {args.student}, batch {args.batch_size}, {name}, torch {torch.__version__}")
    print(f"| pipeline | images/s |\n|---|---|\n| reference (DataLoader + PIL, {args.workers} workers, fp32) | "
          f"{results['reference']:.0f} |\n| ours | {results['ours']:.0f} |")
    print(f"ratio ours / reference: {results['ours'] / results['reference']:.2f}x")


if __name__ == "__main__":
    main()

"""The ImageNet models and the papers' ImageNet and 224-px pairs: what each method adds, and each method on
each pair for real (CPU is enough).

    python benchmarks/imagenet_pairs.py                  # the tables: models, parameters per pair, one step
    python benchmarks/imagenet_pairs.py --two-epochs     # also 2 epochs of each script on the 64-px pairs
    python benchmarks/imagenet_pairs.py --bn-check       # why those runs' losses are large (ResNet teachers)

1. The models: parameters (1000 classes) and stage output shapes at 224 px.
2. The pairs: the student's parameters and what each method adds for training at 224 px, 1000 classes
   (Block-KD's connectors, SSKD's adapters over all stages, LFCC's projectors and channel reductions).
3. One training step of each method on each pair, built as benchmarks/throughput.py builds it (the method
   scripts' own functions): at 64 px where both models allow it, else 224 (the ViTs, DeiTs and Mixer), batch
   4, random images: the loss is finite, the frozen teacher unchanged, the student changed; the step's time.
4. With --bn-check: why the 2-epoch runs' losses are large with ResNet teachers: a teacher trained for 2
   SGD steps (as theirs) has BatchNorm running statistics far from its activations, so its eval-mode logits
   (running statistics) are much larger than its train-mode ones (batch statistics); a LayerNorm teacher's
   are not.
5. With --two-epochs: `blockwise_kd.py`, `sskd.py` and `lfcc.py` for 2 epochs on 100 synthetic images at 64
   px for the pairs that allow it (a teacher trained first for 1 epoch): each run ends with a finite loss
   and a student other than its initialisation.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import blockwise_kd  # noqa: E402
import common  # noqa: E402
import lfcc  # noqa: E402
import models  # noqa: E402
import sskd  # noqa: E402
from throughput import build_method, method_args  # noqa: E402

PAIRS = [  # the KD benchmarks' two ImageNet pairs (Block-KD's table), then OFA-KD's heterogeneous ones (LFCC)
    ("tv_resnet34", "tv_resnet18"), ("tv_resnet50", "mdistiller_mobilenetv1"),
    ("tv_swin_t", "tv_resnet18"), ("timm_deit_small_patch16_224", "tv_resnet18"),
    ("timm_mixer_b16_224", "tv_resnet18"), ("tv_convnext_tiny", "timm_deit_tiny_patch16_224"),
    ("tv_resnet50", "timm_deit_tiny_patch16_224"), ("tv_swin_t", "tv_mobilenet_v2"),
]
METHODS = ["blockkd", "sskd_stage", "lfcc"]


def count(module):
    return sum(p.numel() for p in module.parameters())


def model_table():
    print("| model | params | stage outputs at 224 px |\n|---|---|---|")
    for name in models.IMAGENET_MODELS:
        with torch.device("meta"):
            model = models.create_model(name, 1000)
            shapes = models.feature_shapes(model, 224)
        shown = ", ".join("x".join(map(str, shape)) for shape in shapes)
        print(f"| {name} | {count(model):,} | {shown} |", flush=True)


def added_parameters(teacher_name, student_name):
    """(student, Block-KD connectors, SSKD adapters, LFCC projectors) parameter counts at 224 px (real
    tensors: LFCC's channel reductions switch autocast off, which the meta device does not have)."""
    with torch.no_grad():
        teacher = models.create_model(teacher_name, 1000).eval().requires_grad_(False)
        student = models.create_model(student_name, 1000)
        stones = blockwise_kd.SteppingStones(teacher, student, range(1, 5), image_size=224)
        pairs = zip(models.feature_shapes(student, 224), models.feature_shapes(teacher, 224))
        adapters = sum(count(sskd.make_adapter(s, t)) for s, t in pairs)
        args = method_args(lfcc, ["--stages", "1", "2", "3", "4"])
        space = lfcc.make_compact_space(student, teacher, args.stages, lfcc.make_filter(args), args.proj_dim,
                                        args.reduce_channels, 224)
    return count(student), count(stones), adapters, count(space)


def one_step(method, teacher_name, student_name, size):
    """One training step: (finite loss, teacher unchanged, student changed, seconds)."""
    model, train_modules, loss_fn, recipe, teacher = build_method(method, teacher_name, student_name, 10,
                                                                  torch.device("cpu"), True, size)
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_student = {k: v.clone() for k, v in model.state_dict().items()}
    fast = common.fast_paths(None, torch.device("cpu"))
    _, step = common.prepare_training(model, train_modules, loss_fn, recipe, fast, torch.device("cpu"))
    model.eval()
    for module in train_modules:
        module.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,), generator=g)
    start = time.perf_counter()
    loss, _ = step(x, y, 1.0, recipe["lr"])
    seconds = time.perf_counter() - start
    unchanged = all(torch.equal(before_teacher[k], v) for k, v in teacher.state_dict().items())
    moved = any(not torch.equal(before_student[k], v) for k, v in model.state_dict().items())
    return bool(torch.isfinite(loss)), unchanged, moved, seconds


def pair_size(teacher_name, student_name):
    fixed = {models.fixed_image_size(teacher_name), models.fixed_image_size(student_name)} - {None}
    return fixed.pop() if fixed else 64


def pairs_table():
    print("\n| teacher -> student | student params | Block-KD connectors | SSKD adapters | LFCC projectors |")
    print("|---|---|---|---|---|")
    for teacher, student in PAIRS:
        student_params, connectors, adapters, projectors = added_parameters(teacher, student)
        print(f"| {teacher} -> {student} | {student_params:,} | {connectors:,} | {adapters:,} | "
              f"{projectors:,} |", flush=True)
    print("\n| teacher -> student | px | method | finite loss | teacher unchanged | student moved | step s |")
    print("|---|---|---|---|---|---|---|")
    for teacher, student in PAIRS:
        size = pair_size(teacher, student)
        for method in METHODS:
            finite, unchanged, moved, seconds = one_step(method, teacher, student, size)
            print(f"| {teacher} -> {student} | {size} | {method} | {finite} | {unchanged} | {moved} | "
                  f"{seconds:.2f} |", flush=True)


def two_epochs():
    """Each script for 2 epochs at 64 px on 100 synthetic images, for the pairs that allow 64 px."""
    print("\n| teacher -> student | script | last train loss | student moved |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for teacher, student in [p for p in PAIRS if pair_size(*p) == 64]:
            for script in ("blockwise_kd.py", "sskd.py", "lfcc.py"):
                out = Path(folder) / f"{teacher}_{student}_{script}"
                command = [sys.executable, str(ROOT / script), "--teacher", teacher, "--student", student,
                           "--dataset", "synthetic", "--image-size", "64", "--train-subset", "100",
                           "--batch-size", "50", "--epochs", "2", "--teacher-epochs", "1", "--device", "cpu",
                           "--checkpoint-dir", str(Path(folder) / "checkpoints"), "--out-dir", str(out)]
                subprocess.run(command, check=True, capture_output=True, text=True)
                summary = json.loads((out / "summary.json").read_text())
                torch.manual_seed(0)  # the script's --seed 0, before it builds the student
                initial = models.create_model(student, 10).state_dict()
                trained = torch.load(out / "model.pth", weights_only=True)["model"]
                moved = any(not torch.equal(initial[k], v) for k, v in trained.items())
                loss = summary["last_epoch"]["train_loss"] if "last_epoch" in summary else \
                    summary["phases"]["head"]["last_epoch"]["train_loss"]
                print(f"| {teacher} -> {student} | {script} | {loss:.4g} | {moved} |", flush=True)


def bn_check():
    """Logit std of a 2-step-trained teacher (batch 50, 64 px, the CNN recipe's SGD) in eval and train mode."""
    print("\n| teacher after 2 SGD steps | logit std, eval mode | logit std, train mode |\n|---|---|---|")
    torch.manual_seed(0)
    x, y = torch.randn(50, 3, 64, 64), torch.randint(0, 10, (50,))
    for name in ("tv_resnet34", "tv_swin_t"):
        model = models.create_model(name, 10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        model.train()
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            eval_std = model.eval()(x).std().item()
            train_std = model.train()(x).std().item()
        print(f"| {name} | {eval_std:.3g} | {train_std:.3g} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--two-epochs", action="store_true", help="also run each script for 2 epochs (64 px)")
    parser.add_argument("--bn-check", action="store_true",
                        help="only the eval/train-mode logits of a 2-step-trained teacher")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads", flush=True)
    if args.bn_check:
        return bn_check()
    model_table()
    pairs_table()
    if args.two_epochs:
        two_epochs()


if __name__ == "__main__":
    main()

"""GPU check in one run of about 7 minutes: each method's training step on the papers' 224-px pairs (eager,
under torchrun, compiled) and 2 epochs of KD and Block-KD on the GPU and the CPU, to see that they learn
alike. Nothing is read from disk or downloaded.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.md        # from the repo root, on the GPU machine
    python benchmarks/gpu_check.py --device cpu --steps 2 --warmup 1 --image-size 64 --batch-size 4   # smoke

Protocol. Each method is built by benchmarks/throughput.py's build_method (the method scripts' own loss and
trained modules, a frozen randomly initialised teacher) and trained by common.prepare_training's step with
bf16 autocast and channels_last. The frozen networks' BatchNorm statistics are first measured on 10 batches,
as a trained network's would be (an initial ResNet's eval-mode logits are in the tens, its losses in the
hundreds or thousands). The data: common.make_synthetic's images of 100 classes, kept at 32 px on the device
and upsampled there by each batch's random resized crop (the scripts' 224-px CIFAR-100 protocol, LFCC's), so
images/s include that augmentation. A config runs --warmup untimed steps, then --steps timed ones. The
parts, in the order they run; a config that would not fit in --budget-seconds is printed as skipped:

    eager     KD (blockwise_kd --stones none --gamma 0 --alpha 0.1 --beta 0.9), Block-KD, SSKD's last-stage
              and head phases on tv_resnet34 -> tv_resnet18 and tv_resnet50 -> mdistiller_mobilenetv1; KD and
              LFCC on tv_swin_t and timm_deit_small_patch16_224 -> tv_resnet18; one process, one GPU
    torchrun  KD and Block-KD on tv_resnet34 -> tv_resnet18 under torchrun over every visible GPU (NCCL), each
              rank a full --batch-size; with one GPU one rank, still through init_process_group and
              common.distributed_loss's DistributedDataParallel
    two-epoch blockwise_kd.py as KD and as Block-KD, resnet20 -> resnet8, --dataset synthetic --train-subset
              3000 (10 classes, 2000 test images), a resnet20 teacher trained first for 2 epochs, on --device,
              then on the CPU; the test accuracies should be within ALIKE_POINTS
    compile   torch.compile (default mode, as --compile) of KD, Block-KD and SSKD's last stage on tv_resnet34
              -> tv_resnet18, then LFCC on tv_swin_t -> tv_resnet18, with what is left of the budget (a
              minute or more of compilation each; one killed at the budget's end says so); CUDA only unless
              named in --parts

torchrun and compile run in a child process, killed at the budget's end; the 2-epoch runs are subprocesses.
A failing config is one line and the others go on. Rows are printed as they come and --out (markdown, a
.json beside it, the children's output in <out>_logs/) is rewritten after each one.

Step table: part; method; teacher -> student; px (input side; the DeiT takes 224 only); batch (images per
step, all ranks); steps (timed); images/s (student images per second over the timed steps, all ranks);
warm-up s (the untimed steps: cuDNN autotuning, compilation); peak GiB (torch.cuda.max_memory_allocated,
rank 0); loss, first -> last 10 % (mean training loss over the first and the last tenth of all steps; the
loss's weights are fixed, past Block-KD's ramp); fell (last < first and every loss finite; SSKD's head
phase fits a new head on the student's untrained frozen backbone, so its loss need not fall); note.
2-epoch table: device; method; teacher's and student's final test accuracy (%); the last epoch's training
loss; seconds of the run (training and tests, not the teacher's).

CPU reference, used when the CPU runs do not fit (CPU_REFERENCE): `python benchmarks/gpu_check.py --device
cpu --parts two-epoch` on a 2-core CPU, 2 threads, torch 2.14.1: teacher 99.95 %, KD 99.00 %, Block-KD
100.00 % (68 s). The spread to expect: the same runs with 1 thread, seeds 0 / 1 / 2, gave KD 97.35 / 98.70 /
97.55 % and Block-KD 99.50 / 99.60 / 99.85 %.
"""
import argparse
import functools
import gc
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
from models import fixed_image_size  # noqa: E402
from throughput import build_method, parse_variant  # noqa: E402

R34, R18 = "tv_resnet34", "tv_resnet18"
PAIRS = {(R34, R18): ["kd", "blockkd", "sskd_stage", "sskd_head"],
         ("tv_resnet50", "mdistiller_mobilenetv1"): ["kd", "blockkd", "sskd_stage", "sskd_head"],
         ("tv_swin_t", R18): ["kd", "lfcc"], ("timm_deit_small_patch16_224", R18): ["kd", "lfcc"]}
UNDER_TORCHRUN = [("kd", R34, R18), ("blockkd", R34, R18)]
COMPILED = [("kd", R34, R18), ("blockkd", R34, R18), ("sskd_stage", R34, R18), ("lfcc", "tv_swin_t", R18)]
PARTS = ["eager", "torchrun", "two-epoch", "compile"]
LABELS = {"kd": "KD", "blockkd": "Block-KD", "sskd_stage": "SSKD last stage", "sskd_head": "SSKD head",
          "lfcc": "LFCC"}
# A config starts only if the longest one of its kind so far (before the first: this guess) still fits.
# Compile's guess is its floor: the first one starts with a minute left, at worst killed at the budget's end.
FIRST_GUESS_SECONDS = {"eager": 20, "torchrun": 20, "compile": 60, "2 epochs cuda": 40, "2 epochs cpu": 60}
CHILD_START_SECONDS = 20  # a child process's imports, CUDA context and process group
PROGRESS = 1000.0  # every step's progress in epochs: past Block-KD's ramp, so a falling loss means learning
KD_FLAGS = ["--stones", "none", "--gamma", "0", "--alpha", "0.1", "--beta", "0.9"]
TWO_EPOCHS = ["--teacher", "resnet20", "--student", "resnet8", "--dataset", "synthetic", "--epochs", "2",
              "--teacher-epochs", "2"]
CPU_REFERENCE = {"kd": 99.00, "blockkd": 100.00}  # test accuracy %, 3000 images, seed 0 (see the docstring)
ALIKE_POINTS = 3.0  # bf16 on the GPU and fp32 on the CPU take different paths: about a seed's spread
STEP_COLUMNS = ["part", "method", "teacher → student", "px", "batch", "steps", "images/s", "warm-up s",
                "peak GiB", "loss, first → last 10 %", "fell", "note"]
EPOCH_COLUMNS = ["device", "method", "teacher acc %", "test acc %", "train loss", "seconds", "note"]


class Budget:
    """The check's deadline (time.time(), shared with the children) and the seconds each kind took so far."""

    def __init__(self, deadline):
        self.deadline, self.taken = deadline, {}

    def left(self):
        return self.deadline - time.time()

    def skip_reason(self, kind, extra=0.0):
        need = max(self.taken.get(kind, [FIRST_GUESS_SECONDS[kind]])) + extra
        if self.left() < need:
            return f"skipped: needs ~{need:.0f} s, {max(0.0, self.left()):.0f} s of the budget left"

    def record(self, kind, seconds):
        self.taken.setdefault(kind, []).append(seconds)


class Report:
    """The two tables: each row printed as it comes, --out and its .json rewritten after each."""

    def __init__(self, out, title):
        self.out, self.title, self.rows, self.notes, self.printing = Path(out), title, [], [], None
        self.logs = self.out.parent / f"{self.out.stem}_logs"  # the child processes' output
        self.logs.mkdir(parents=True, exist_ok=True)
        print(title, flush=True)

    def add(self, row):
        if self.printing != row["table"]:
            print("\n" + table_header(row["table"]), flush=True)
            self.printing = row["table"]
        print(markdown_row(row), flush=True)
        self.rows.append(row)
        self.save()

    def note(self, text):
        print(text, flush=True)
        self.notes.append(text)
        self.save()

    def save(self):
        tables = ["\n".join([table_header(t)] + [markdown_row(r) for r in self.rows if r["table"] == t])
                  for t in ("steps", "epochs") if any(r["table"] == t for r in self.rows)]
        text = "\n\n".join([self.title] + tables + self.notes) + "\n"
        rows = json.dumps(self.rows, indent=1)
        for path, content in ((self.out, text), (self.out.with_suffix(".json"), rows)):
            temporary = path.with_name(path.name + ".tmp")  # a reader never sees half a file
            temporary.write_text(content)
            temporary.replace(path)


def table_header(table):
    columns = STEP_COLUMNS if table == "steps" else EPOCH_COLUMNS
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def show(value, spec):
    return "-" if value is None else format(value, spec)


def markdown_row(r):
    method = LABELS.get(r["method"], r["method"])
    if r["table"] == "epochs":
        cells = [r["device"], method, show(r["teacher_acc"], ".2f"), show(r["test_acc"], ".2f"),
                 show(r["train_loss"], ".4g"), show(r["seconds"], ".0f")]
    else:
        loss = "-" if r["loss_first"] is None else f"{r['loss_first']:.4g} → {r['loss_last']:.4g}"
        fell = {None: "-", True: "yes", False: "no" if r["note"] else "**no**"}[r["loss_fell"]]
        cells = [r["part"], method, f"{r['teacher']} → {r['student']}", r["px"], r["batch"],
                 show(r["steps"], "d"), show(r["images_per_s"], ".0f"), show(r["warmup_s"], ".1f"),
                 show(r["peak_gib"], ".2f"), loss, fell]
    return "| " + " | ".join(map(str, cells + [r["note"]])) + " |"


def step_row(config, part, args, note=""):
    """A row of the step table, to be filled in by measure (or left with its note: skipped, failed)."""
    method, teacher, student = config
    return dict(table="steps", part=part, method=method, teacher=teacher, student=student,
                px=fixed_image_size(teacher) or fixed_image_size(student) or args.image_size,
                batch=args.batch_size * common.world_size(), steps=None, images_per_s=None, warmup_s=None,
                peak_gib=None, loss_first=None, loss_last=None, finite=None, loss_fell=None, note=note)


def one_line(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


@functools.lru_cache(maxsize=1)
def synthetic_images(num_classes, count):
    """make_synthetic's 32-px images and labels, made once (10,000 take seconds)."""
    (train_x, train_y, _, _), _ = common.make_synthetic(num_classes, train_size=count, test_size=0)
    return train_x, train_y


def synthetic_data(args, image_size, device):
    """The images of a config (at most 10,000: an epoch of 78 batches of 128), kept at 32 px on the device
    and upsampled there by each batch's crop."""
    used = (args.warmup + args.steps + 10) * args.batch_size * common.world_size()  # 10: the BN statistics
    train_x, train_y = synthetic_images(args.num_classes, min(10_000, used))
    pixels = train_x.float().div(255)
    mean, std = pixels.mean((0, 2, 3)).tolist(), pixels.std((0, 2, 3)).tolist()
    return common.Data(train_x, train_y, train_x[:0], train_y[:0], args.num_classes, mean, std, "synthetic",
                       image_size).to(device)


def endless_batches(data, batch_size, channels_last):
    """This rank's full batches, epoch after epoch (a smaller last batch would be another shape to tune or
    compile, so it is dropped)."""
    shard = (common.rank(), common.world_size())
    for epoch in itertools.count():
        for x, y in data.train_batches(batch_size * shard[1], 0, epoch, channels_last, shard):
            if len(y) == batch_size:
                yield x, y


def measure_batchnorm_statistics(network, batches, device, count=10):
    """The network's BatchNorm running statistics set to their mean over `count` batches; then eval mode."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative mean
    network.train()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(count if norms else 0):
            network(next(batches)[0])
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    network.eval()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config, part, args, device, budget):
    """One config: the method built, --warmup + --steps steps run, its row returned."""
    method, teacher_name, student_name = config
    row = step_row(config, part, args)
    fast = parse_variant("ours+bf16+cl" + ("+compile" if part == "compile" else ""), device)
    model, train_modules, loss_fn, recipe, teacher = build_method(
        method, teacher_name, student_name, args.num_classes, device, fast.channels_last, row["px"])
    batches = endless_batches(synthetic_data(args, row["px"], device), args.batch_size, fast.channels_last)
    for network in (teacher, model):
        measure_batchnorm_statistics(network, batches, device)
    if dist.is_initialized() and common.world_size() == 1:
        # prepare_training wraps the loss in DDP from 2 ranks on; with one GPU it goes through DDP here
        for module in [model] + train_modules:
            module.to(memory_format=torch.channels_last)
        loss_fn = common.distributed_loss(train_modules, loss_fn, device)
    _, step = common.prepare_training(model, train_modules, loss_fn, recipe, fast, device)
    for module in train_modules:  # as fit does: the rest of the student (SSKD) stays in eval mode
        module.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, start, warmup_seconds = [], time.perf_counter(), 0.0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            synchronize(device)
            warmup_seconds, start = time.perf_counter() - start, time.perf_counter()
        x, y = next(batches)
        losses.append(step(x, y, PROGRESS, recipe["lr"])[0])  # kept on the device: no sync per step
        # The ranks must run the same steps, so only a single process stops at the budget's end.
        if common.world_size() == 1 and time.time() > budget.deadline and i + 1 < args.warmup + args.steps:
            row["note"] = f"cut at the budget's end after {i + 1} steps"
            break
    synchronize(device)
    seconds, timed = time.perf_counter() - start, len(losses) - args.warmup
    if timed > 0:
        speed = torch.tensor(timed * args.batch_size / seconds, device=device)
        row["images_per_s"] = common.sum_across_ranks({"speed": speed})["speed"].item()
    loss, tenth = torch.stack(losses).float().cpu(), max(1, len(losses) // 10)
    row.update(steps=max(0, timed), warmup_s=warmup_seconds, loss_first=loss[:tenth].mean().item(),
               loss_last=loss[-tenth:].mean().item())
    row["finite"] = bool(torch.isfinite(loss).all())
    row["loss_fell"] = row["finite"] and row["loss_last"] < row["loss_first"]
    if method == "sskd_head" and not row["loss_fell"]:
        row["note"] = row["note"] or "expected: a new head on an untrained, frozen backbone"
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return row


def run_configs(configs, part, args, device, budget, emit):
    """Each config measured unless it would not fit; a failure is one row and the next config goes on."""
    for config in configs:
        reason = budget.skip_reason(part)
        if reason:
            emit(step_row(config, part, args, reason))
            continue
        started = time.time()
        try:
            emit(measure(config, part, args, device, budget))
        except (Exception, SystemExit) as error:  # CUDA out of memory too: the cache is emptied below
            emit(step_row(config, part, args, "failed: " + one_line(error)))
        gc.collect()
        if device.type == "cuda":
            try:
                torch.cuda.empty_cache()
            except RuntimeError:  # a broken CUDA context: the next configs still try, and fail with a line
                pass
        budget.record(part, time.time() - started)


def in_child(part, configs, args, budget, report, nproc=None):
    """The configs of `part` in a child process (under torchrun with nproc ranks if given), so that compiled
    graphs and a process group end with it; killed at the budget's end. Its rows come through a JSON-lines
    file and are printed as they arrive."""
    label = f"torchrun, {nproc} rank{'s' * (nproc > 1)}" if nproc else part
    reason = budget.skip_reason(part, CHILD_START_SECONDS)
    if reason:
        return [report.add(step_row(c, label, args, reason)) for c in configs]
    results, log = report.logs / f"{part}.jsonl", report.logs / f"{part}.log"
    results.unlink(missing_ok=True)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    command = [sys.executable, *launcher, str(Path(__file__).resolve()), "--child", part, "--results",
               str(results), "--deadline", repr(budget.deadline), "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--num-classes", str(args.num_classes),
               "--compile-backend", args.compile_backend, "--configs", *["/".join(c) for c in configs]]
    rows, killed = [], False
    with open(log, "w") as output:  # its own process group, so that torchrun's ranks are killed with it
        child = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        while True:
            finished = child.poll() is not None
            written = results.read_text().split("\n")[:-1] if results.exists() else []  # whole lines only
            new = [json.loads(line) for line in written]
            for row in new[len(rows):]:
                report.add(row)
            rows = new
            if finished:
                break
            if time.time() > budget.deadline + 10 and not killed:  # a compilation does not stop by itself
                os.killpg(child.pid, signal.SIGKILL)
                killed = True
            time.sleep(1)
    why = ("killed at the budget's end" if killed
           else f"failed: exit code {child.returncode}: {error_line(log)}")
    done = {(r["method"], r["teacher"], r["student"]) for r in rows}
    for config in configs:
        if config not in done:
            report.add(step_row(config, label, args, why))


def error_line(log):
    """The first exception line of a child's output (torchrun ends with a summary), else its last line."""
    lines = [line.strip() for line in log.read_text().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", line)
              and "ChildFailedError" not in line]
    return (errors or lines or [""])[0 if errors else -1][:200]


def child_main(args):
    """in_child's child (under torchrun: each rank; rank 0 writes the rows)."""
    device = torch.device(args.device)
    if "LOCAL_RANK" in os.environ:  # common.init_distributed joins from 2 ranks on; here one joins too
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    fast_cuda(device)
    world = common.world_size()
    label = f"torchrun, {world} rank{'s' * (world > 1)}, {dist.get_backend()} DDP" if dist.is_initialized() \
        else args.child
    if args.child == "compile" and args.compile_backend != "inductor":  # every torch.compile of this process
        torch.compile = functools.partial(torch.compile, backend=args.compile_backend)
        label += f" ({args.compile_backend})"

    def emit(row):
        if common.rank() == 0:
            with open(args.results, "a") as results:
                results.write(json.dumps({**row, "part": label}) + "\n")
    configs = [tuple(c.split("/")) for c in args.configs]
    run_configs(configs, args.child, args, device, Budget(args.deadline), emit)
    if dist.is_initialized():
        dist.destroy_process_group()


def two_epoch_runs(device_name, args, budget, report, folder):
    """blockwise_kd.py as KD, then as Block-KD, for 2 epochs on `device_name` (the first run trains the
    teacher into this device's checkpoint folder). Returns {method: test accuracy}."""
    kind, accuracies = f"2 epochs {torch.device(device_name).type}", {}
    for method in ("kd", "blockkd"):
        row = dict(table="epochs", device=device_name, method=method, teacher_acc=None, test_acc=None,
                   train_loss=None, seconds=None, note=budget.skip_reason(kind) or "")
        if row["note"]:
            report.add(row)
            continue
        out = Path(folder) / device_name / method
        command = [sys.executable, str(ROOT / "blockwise_kd.py"), *TWO_EPOCHS, "--device", device_name,
                   "--checkpoint-dir", str(Path(folder) / device_name / "checkpoints"), "--out-dir", str(out),
                   "--train-subset", str(args.two_epoch_images), "--test-subset", str(args.two_epoch_test_images),
                   *(KD_FLAGS if method == "kd" else [])]
        started = time.time()
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False,
                                  timeout=max(1, budget.left()))
            (report.logs / f"two_epochs_{device_name}_{method}.log").write_text(done.stdout + done.stderr)
            if done.returncode:
                last = (done.stderr.strip() or done.stdout.strip() or " ").splitlines()[-1]
                row["note"] = f"failed: exit code {done.returncode}: {last[:200]}"
            else:
                summary = json.loads((out / "summary.json").read_text())
                row.update(teacher_acc=summary["teacher"]["test_acc"], test_acc=summary["last_acc"],
                           train_loss=summary["last_epoch"]["train_loss"], seconds=summary["seconds"])
                accuracies[method] = summary["last_acc"]
        except subprocess.TimeoutExpired:
            row["note"] = "killed at the budget's end"
        budget.record(kind, time.time() - started)
        report.add(row)
    return accuracies


def two_epoch_part(args, device, budget, report):
    """The 2-epoch runs on --device, then on the CPU, and whether their accuracies agree."""
    with tempfile.TemporaryDirectory() as folder:
        here = two_epoch_runs(args.device, args, budget, report, folder)
        if device.type == "cpu":
            return
        cpu = two_epoch_runs("cpu", args, budget, report, folder)
    reference = cpu or (CPU_REFERENCE if (args.two_epoch_images, args.two_epoch_test_images) == (3000, 0) else {})
    for method in ("kd", "blockkd"):
        if method not in here or method not in reference:
            report.note(f"2 epochs, {LABELS[method]}: not compared (a run is missing)")
            continue
        gap = here[method] - reference[method]
        report.note(f"2 epochs, {LABELS[method]}: {args.device} {here[method]:.2f} % against "
                    f"{'the CPU' if cpu else 'the committed CPU reference'} {reference[method]:.2f} % "
                    f"({gap:+.2f} points): {'alike' if abs(gap) <= ALIKE_POINTS else '**NOT alike**'}")


def fast_cuda(device):
    if device.type == "cuda":  # as common.setup: cuDNN autotuning, TF32 for what stays float32
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda where there is one)")
    parser.add_argument("--steps", type=common.positive_int, default=100,
                        help="timed training steps per config (default 100)")
    parser.add_argument("--warmup", type=common.nonnegative_int, default=10,
                        help="untimed steps before them: cuDNN autotuning, compilation (default 10)")
    parser.add_argument("--image-size", type=common.positive_int, default=224,
                        help="input side in px (default 224; the DeiT pair always runs at 224)")
    parser.add_argument("--batch-size", type=common.positive_int, default=128,
                        help="images per step (per rank under torchrun; default 128)")
    parser.add_argument("--num-classes", type=common.positive_int, default=100,
                        help="classes of the synthetic data and the models' heads (default 100, CIFAR-100's)")
    parser.add_argument("--budget-seconds", type=common.positive_float, default=420,
                        help="wall-clock seconds of the whole check; what would not fit is skipped "
                             "(default 420)")
    names = [f"{t}:{s}" for t, s in PAIRS]
    parser.add_argument("--pairs", nargs="+", choices=names, metavar="TEACHER:STUDENT",
                        help="only these pairs (default all: " + ", ".join(names) + ")")
    parser.add_argument("--methods", nargs="+", choices=list(LABELS), help="only these methods (default all)")
    parser.add_argument("--parts", nargs="+", choices=PARTS,
                        help="only these parts (default all; compile only on CUDA unless named here)")
    parser.add_argument("--compile-backend", choices=["inductor", "aot_eager"], default="inductor",
                        help="the compile part's torch.compile backend (default inductor, as --compile; "
                             "aot_eager: dynamo's capture without code generation, a quick check on a CPU)")
    parser.add_argument("--two-epoch-images", type=common.positive_int, default=3000,
                        help="training images of the 2-epoch runs (default 3000, CPU_REFERENCE's)")
    parser.add_argument("--two-epoch-test-images", type=common.nonnegative_int, default=0,
                        help="test images of the 2-epoch runs, a class-balanced subset (default 0: the whole "
                             "test split, CPU_REFERENCE's)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check" / "gpu_check.md",
                        help="the markdown tables (default runs/gpu_check/gpu_check.md); a .json beside it")
    parser.add_argument("--child", choices=["torchrun", "compile"], help="internal: run as in_child's child")
    parser.add_argument("--results", help="internal: the child's JSON-lines file of rows")
    parser.add_argument("--deadline", type=float, help="internal: the budget's end (time.time())")
    parser.add_argument("--configs", nargs="+", default=[],
                        help="internal: the child's configs, METHOD/TEACHER/STUDENT")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    budget, device = Budget(time.time() + args.budget_seconds), torch.device(args.device)
    fast_cuda(device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    where = (f"{torch.cuda.get_device_name(device)} x {gpus}" if gpus
             else f"CPU, {torch.get_num_threads()} threads")
    report = Report(args.out, f"gpu_check: {where}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
                              f"{args.steps} timed steps after {args.warmup}, batch {args.batch_size}, bf16 "
                              f"autocast, channels_last, {args.num_classes} classes; budget "
                              f"{args.budget_seconds:.0f} s")
    pairs = [tuple(p.split(":")) for p in args.pairs] if args.pairs else list(PAIRS)
    configs = [(m, t, s) for (t, s) in pairs for m in PAIRS[(t, s)] if m in (args.methods or LABELS)]
    parts = args.parts or [p for p in PARTS if p != "compile" or device.type == "cuda"]
    for part in PARTS:
        if part not in parts:
            why = " (CUDA only unless named in --parts)" if part == "compile" else ""
            report.note(f"{part}: not run{why}")
    if "eager" in parts:
        run_configs(configs, "eager", args, device, budget, report.add)
    if "torchrun" in parts:
        in_child("torchrun", [c for c in UNDER_TORCHRUN if c in configs] or configs[:1], args, budget, report,
                 nproc=max(1, gpus))
    if "two-epoch" in parts:
        two_epoch_part(args, device, budget, report)
    if "compile" in parts:
        in_child("compile", [c for c in COMPILED if c in configs] or configs[:1], args, budget, report)
    report.note(f"done in {args.budget_seconds - budget.left():.0f} s")


if __name__ == "__main__":
    main()

"""The CPU mini-benchmark on real images (../shared/reference/mini_benchmark.md), as a resumable grid.

Teacher resnet20 trained once on the 5,000-image class-balanced subset of the CIFAR-10 image folder (30
epochs, seed 0); then for each pair and seed: the student alone, plain KD, Block-KD, SSKD and LFCC, 20
epochs, test accuracy on the full 10,000-image test split. Writes runs/mini/table.md.

    mkdir -p ~/data/cifar10 && tar -xzf ../shared/data/cifar10_jpeg.tar.gz -C ~/data/cifar10
    python benchmarks/mini_benchmark.py --data-dir ~/data/cifar10                 # the whole grid
    python benchmarks/mini_benchmark.py --data-dir ~/data/cifar10 --methods student kd blockkd --seeds 0
    python benchmarks/mini_benchmark.py --table-only                               # just rebuild the table

Runs whose summary.json exists are not run again, so an interrupted grid continues where it stopped.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # row name -> (script, extra flags)
    "student": ("common.py", []),
    "kd": ("blockwise_kd.py", ["--stones", "none", "--gamma", "0", "--alpha", "0.1", "--beta", "0.9"]),
    "blockkd": ("blockwise_kd.py", []),
    "sskd": ("sskd.py", []),
    "lfcc": ("lfcc.py", []),
}
LABELS = {"student": "student alone", "kd": "KD (0.1 CE + 0.9 KL, T=4)", "blockkd": "Block-KD",
          "sskd": "SSKD", "lfcc": "LFCC"}


def run(command, log_path):
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(command), flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"failed (exit {code}); see {log_path}")
    return time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path.home() / "data" / "cifar10"), help="the unpacked image folder")
    parser.add_argument("--out", default="runs/mini", help="where runs and table.md go")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="rows to run")
    parser.add_argument("--students", nargs="+", default=["resnet8", "mlp_mixer"], help="students (teacher resnet20)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per row")
    parser.add_argument("--epochs", type=int, default=20, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args()
    out = ROOT / args.out
    data = ["--dataset", "folder", "--data-dir", args.data_dir, "--train-subset", "5000"]
    teacher_dir = out / "teacher_resnet20"
    if not args.table_only:
        if not (teacher_dir / "summary.json").exists():
            seconds = run([sys.executable, "common.py", "--model", "resnet20", *data, "--epochs",
                           str(args.teacher_epochs), "--seed", "0", "--out-dir", str(teacher_dir), "--resume"],
                          teacher_dir / "log.txt")
            print(f"teacher trained in {seconds:.0f}s", flush=True)
        for student in args.students:
            for method in args.methods:
                for seed in args.seeds:
                    run_dir = out / f"{method}_{student}_seed{seed}"
                    if (run_dir / "summary.json").exists():
                        continue
                    script, flags = METHODS[method]
                    model_flags = ["--model", student] if method == "student" else \
                        ["--teacher", "resnet20", "--student", student, "--teacher-ckpt", str(teacher_dir / "model.pth")]
                    seconds = run([sys.executable, script, *model_flags, *flags, *data, "--epochs", str(args.epochs),
                                   "--seed", str(seed), "--out-dir", str(run_dir), "--resume"], run_dir / "log.txt")
                    (run_dir / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    write_table(out, args)


def mean_std(values):
    if not values:
        return "–"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def write_table(out, args):
    teacher = json.loads((out / "teacher_resnet20" / "summary.json").read_text()) \
        if (out / "teacher_resnet20" / "summary.json").exists() else None
    lines = ["| teacher → student | method | seeds | last-epoch acc % | best-epoch acc % | s / run |",
             "|---|---|---|---|---|---|"]
    for student in args.students:
        for method in METHODS:
            runs = sorted(out.glob(f"{method}_{student}_seed*/summary.json"))
            if not runs:
                continue
            summaries = [json.loads(p.read_text()) for p in runs]
            walls = [float(p.parent.joinpath("wall_seconds.txt").read_text()) for p in runs
                     if p.parent.joinpath("wall_seconds.txt").exists()]
            seeds = ",".join(p.parent.name.rsplit("seed", 1)[1] for p in runs)
            wall = f"{statistics.mean(walls):.0f}" if walls else "–"
            lines.append(f"| resnet20 → {student} | {LABELS[method]} | {seeds} | "
                         f"{mean_std([s['last_acc'] for s in summaries])} | "
                         f"{mean_std([s['best_acc'] for s in summaries])} | {wall} |")
    head = ""
    if teacher:
        head = (f"Teacher resnet20: {teacher['last_acc']:.2f} % (last epoch, {teacher['epochs']} epochs, seed 0). "
                f"Students: {args.epochs} epochs, CIFAR-10 image folder, 5,000-image subset, full 10,000-image test split.\n\n")
    table = head + "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

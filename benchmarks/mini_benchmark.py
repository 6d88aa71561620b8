"""The CPU mini-benchmark on real images (../shared/reference/mini_benchmark.md), as a resumable grid.

Teacher resnet20 trained once on the 5,000-image class-balanced subset of the CIFAR-10 image folder (30
epochs, seed 0); then for each student, seed and row below, one 20-epoch run, tested on the full
10,000-image test split. Writes <out>/table.md (last- and best-epoch accuracy, mean ± std over seeds, wall
seconds per run) and, per run, <out>/<row>_<student>_seed<S>/run_info.json (command, commit, seconds).

    mkdir -p ~/data/cifar10 && tar -xzf ../shared/data/cifar10_jpeg.tar.gz -C ~/data/cifar10
    python benchmarks/mini_benchmark.py                                   # the main grid, 2 runs at a time
    python benchmarks/mini_benchmark.py --rows student kd cekd --seeds 0  # some rows
    python benchmarks/mini_benchmark.py --rows sskd sskd_s6_h2 sskd_s10_h5 sskd_s20_h5 --students resnet8
    python benchmarks/mini_benchmark.py --table-only                      # just rebuild the table
    python benchmarks/mini_benchmark.py --feature-energy                  # the teacher's mean(t_k^2) per stage

A run whose summary.json exists is not run again and an interrupted one resumes (every run gets --resume),
so the grid can be stopped and restarted at any time. Every run uses `--amp bf16` by default (this CPU has
native bf16; the accuracy check in benchmarks/README.md found it within the seed spread of fp32 at 2.4x the
speed).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_STONES = ["--stones", "none", "--gamma", "0"]
EVEN_SPLIT = ["--stage-epochs", "5", "--head-epochs", "5"]  # sskd.py's default split of 20 epochs until the budget study
ROWS = {  # row -> (script, flags, label). Order = order of the table.
    "student": ("common.py", [], "student alone"),
    "kd": ("blockwise_kd.py", NO_STONES + ["--alpha", "0.1", "--beta", "0.9"], "KD as in the benchmark (0.1·CE + 0.9·KD, T=4)"),
    "cekd": ("blockwise_kd.py", NO_STONES, "**CE + KD control** (1·CE + 1·KD, T=4)"),
    "blockkd": ("blockwise_kd.py", [], "Block-KD"),
    "blockkd_nocross": ("blockwise_kd.py", ["--gamma", "0"], "Block-KD without L_cross (`--gamma 0`)"),
    "lfcc": ("lfcc.py", [], "LFCC"),
    "lfcc_nolowpass": ("lfcc.py", ["--no-lowpass"], "LFCC without the low-pass filter (`--no-lowpass`)"),
    "lfcc_beta0": ("lfcc.py", ["--beta", "0"], "LFCC with `--beta 0` (= the CE + KD control)"),
    "lfcc_perscale": ("lfcc.py", ["--per-scale"], "LFCC, one alignment per scale (`--per-scale`)"),
    "lfcc_reduce8": ("lfcc.py", ["--reduce-channels", "8"], "LFCC, every stage reduced to 8 channels (`--reduce-channels 8`)"),
    "sskd": ("sskd.py", EVEN_SPLIT, "SSKD as in the paper (stages, then head on labels)"),
    "sskd_unnormalised": ("sskd.py", ["--feat-norm", "none", *EVEN_SPLIT],
                          "SSKD, plain MSE × 10 (`--feat-norm none`, the loss before issue 30)"),
    "sskd_clip": ("sskd.py", ["--feat-norm", "none", "--grad-clip", "1", *EVEN_SPLIT],
                  "SSKD, plain MSE × 10, gradient norm clipped at 1 (`--feat-norm none --grad-clip 1`)"),
    "sskd_joint": ("sskd.py", ["--joint", *EVEN_SPLIT], "SSKD `--joint` (departure: all stages at once)"),
    "sskd_finetune": ("sskd.py", ["--finetune-all", *EVEN_SPLIT], "SSKD `--finetune-all` (departure: phase B trains all)"),
    # The SSKD budget study: epochs per stage phase (s) and of the head phase (h); s6_h2 is today's default.
    "sskd_s6_h2": ("sskd.py", ["--stage-epochs", "6", "--head-epochs", "2"], "SSKD as in the paper"),
    "sskd_s10_h5": ("sskd.py", ["--stage-epochs", "10", "--head-epochs", "5"], "SSKD as in the paper"),
    "sskd_s20_h5": ("sskd.py", ["--stage-epochs", "20", "--head-epochs", "5"], "SSKD as in the paper"),
    "sskd_s20_h2": ("sskd.py", ["--stage-epochs", "20", "--head-epochs", "2"], "SSKD as in the paper"),
}
MAIN_ROWS = ["student", "kd", "cekd", "blockkd", "blockkd_nocross", "lfcc", "lfcc_nolowpass", "sskd", "sskd_joint",
             "sskd_finetune"]
print_lock = threading.Lock()


def say(text):
    with print_lock:
        print(time.strftime("%H:%M:%S"), text, flush=True)


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(command, run_dir, threads):
    """Run one command with its output (stdout and stderr) in run_dir/output.txt; returns wall seconds, or None if
    it failed."""
    if (run_dir / "summary.json").exists():  # finished meanwhile (by another invocation): keep its run_info
        return wall_seconds(run_dir) or 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    say("$ " + " ".join(command))
    start = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(run_dir / "output.txt", "a") as log:  # the run keeps its own log.txt beside it
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.time() - start
    if code != 0:
        say(f"FAILED (exit {code}) after {seconds:.0f}s: see {run_dir / 'output.txt'}")
        return None
    info = {"seconds": round(seconds, 1), "commit": commit(), "threads": threads, "command": command}
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=1) + "\n")
    say(f"done in {seconds:.0f}s: {run_dir.name}")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path.home() / "data" / "cifar10"), help="the unpacked image folder")
    parser.add_argument("--out", default="runs/mini", help="where the runs and table.md go (default runs/mini)")
    parser.add_argument("--rows", nargs="+", default=MAIN_ROWS, choices=list(ROWS), metavar="ROW",
                        help=f"rows to run (default: {' '.join(MAIN_ROWS)}); all: {' '.join(ROWS)}")
    parser.add_argument("--students", nargs="+", default=["resnet8", "mlp_mixer"], help="students (teacher resnet20)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per row (default 0 1 2)")
    parser.add_argument("--epochs", type=int, default=20, help="student epochs (default 20)")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs (default 30)")
    parser.add_argument("--amp", choices=["bf16", "off"], default="bf16", help="passed to every run (default bf16)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument("--feature-energy", action="store_true",
                        help="print the teacher's mean squared stage outputs on the test split, the scale of "
                             "SSKD's test feature MSE (stage_feat_mse in its summary.json), and exit")
    args = parser.parse_args()
    out = ROOT / args.out
    if args.feature_energy:
        return print_feature_energy(out / "teacher_resnet20" / "model.pth", args.data_dir)
    protocol = ["--dataset", "folder", "--data-dir", args.data_dir, "--train-subset", "5000", "--amp", args.amp]
    teacher_dir = out / "teacher_resnet20"
    failed = 0
    if not args.table_only:
        if not (teacher_dir / "summary.json").exists():
            command = [sys.executable, "common.py", "--model", "resnet20", *protocol, "--epochs",
                       str(args.teacher_epochs), "--seed", "0", "--out-dir", str(teacher_dir), "--resume"]
            if run(command, teacher_dir, args.jobs * args.threads) is None:
                sys.exit("the teacher failed; nothing else was run")
        todo = []
        for student in args.students:
            for seed in args.seeds:
                for row in args.rows:
                    run_dir = out / f"{row}_{student}_seed{seed}"
                    if (run_dir / "summary.json").exists():
                        continue
                    script, flags, _ = ROWS[row]
                    models = ["--model", student] if script == "common.py" else \
                        ["--teacher", "resnet20", "--student", student, "--teacher-ckpt", str(teacher_dir / "model.pth")]
                    todo.append(([sys.executable, script, *models, *flags, *protocol, "--epochs", str(args.epochs),
                                  "--seed", str(seed), "--out-dir", str(run_dir), "--resume"], run_dir))
        say(f"{len(todo)} runs to do, {args.jobs} at a time")
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda job: run(*job, args.threads), todo))
        failed = sum(r is None for r in results)
    write_table(out, args)
    if failed:
        sys.exit(f"{failed} runs failed (see their output.txt); rerun the same command to retry them")


def print_feature_energy(teacher_file, data_dir):
    sys.path.insert(0, str(ROOT))
    import torch
    import common
    import models
    data = common.load_data(argparse.Namespace(dataset="folder", data_dir=data_dir, train_subset=5000),
                            torch.device("cpu"))
    teacher = common.build_model("resnet20", data.num_classes, torch.device("cpu")).eval()
    common.load_weights(teacher, teacher_file)
    sums = [0.0, 0.0, 0.0]
    with torch.no_grad():
        for x, y in data.test_batches():
            features, _ = models.stage_features(teacher, x)
            sums = [s + f.float().pow(2).mean().item() * len(y) for s, f in zip(sums, features)]
    print("teacher resnet20, mean squared stage output on the test split (stages 1, 2, 3):",
          " ".join(f"{s / len(data.test_y):.4f}" for s in sums))


def mean_std(values):
    if not values:
        return "–"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def wall_seconds(run_dir):
    if (run_dir / "run_info.json").exists():
        return json.loads((run_dir / "run_info.json").read_text())["seconds"]
    if (run_dir / "wall_seconds.txt").exists():  # runs made before run_info.json
        return float((run_dir / "wall_seconds.txt").read_text())
    return None


def label(row, summary):
    text = ROWS[row][2]
    if "phases" in summary:  # SSKD: show the budget split, epochs per phase
        text += f", epochs {' + '.join(str(p['epochs']) for p in summary['phases'].values())}"
    return text


# Each method against the control that shares its loss weights (and each ablation against its method).
COMPARISONS = [("kd", "student"), ("cekd", "student"), ("blockkd", "cekd"), ("blockkd", "blockkd_nocross"),
               ("lfcc", "cekd"), ("lfcc", "lfcc_nolowpass"), ("lfcc_perscale", "lfcc"), ("lfcc_reduce8", "lfcc"),
               ("lfcc_beta0", "cekd"), ("sskd", "student"), ("sskd", "sskd_unnormalised"), ("sskd_clip", "sskd"),
               ("sskd_joint", "sskd"), ("sskd_finetune", "sskd")]


def last_accuracies(out, row, student):
    return [json.loads(p.read_text())["last_acc"] for p in sorted(out.glob(f"{row}_{student}_seed*/summary.json"))]


def comparison_lines(out, students):
    """Difference of mean last-epoch accuracy, with its standard error sqrt(s_a^2/n_a + s_b^2/n_b) where both
    rows have 2+ seeds; a difference is called clear when it exceeds twice that."""
    lines = ["| student | comparison | seeds | Δ last-epoch acc (points) | standard error | clear? |",
             "|---|---|---|---|---|---|"]
    for student in students:
        for row, control in COMPARISONS:
            a, b = last_accuracies(out, row, student), last_accuracies(out, control, student)
            if not a or not b:
                continue
            delta = statistics.mean(a) - statistics.mean(b)
            if len(a) > 1 and len(b) > 1:
                error = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
                shown, clear = f"{error:.2f}", "yes" if abs(delta) > 2 * error else "no"
            else:
                shown, clear = "–", "one seed"
            names = [ROWS[r][2].replace("**", "") for r in (row, control)]
            lines.append(f"| {student} | {names[0]} − {names[1]} | {len(a)} vs {len(b)} | "
                         f"{delta:+.2f} | {shown} | {clear} |")
    return lines


def write_table(out, args):
    teacher = json.loads((out / "teacher_resnet20" / "summary.json").read_text()) \
        if (out / "teacher_resnet20" / "summary.json").exists() else None
    lines = ["| teacher → student | row | seeds | last-epoch acc % | best-epoch acc % | s / run (median) |",
             "|---|---|---|---|---|---|"]
    for student in args.students:
        for row in ROWS:
            runs = sorted(out.glob(f"{row}_{student}_seed*/summary.json"))
            if not runs:
                continue
            summaries = [json.loads(p.read_text()) for p in runs]
            walls = [w for w in (wall_seconds(p.parent) for p in runs) if w is not None]
            seeds = ",".join(p.parent.name.rsplit("seed", 1)[1] for p in runs)
            wall = f"{statistics.median(walls):.0f}" if walls else "–"  # median: one run slowed by other jobs
            lines.append(f"| resnet20 → {student} | {label(row, summaries[0])} | {seeds} | "
                         f"{mean_std([s['last_acc'] for s in summaries])} | "
                         f"{mean_std([s['best_acc'] for s in summaries])} | {wall} |")
    head = ""
    if teacher:
        head = (f"Teacher resnet20: {teacher['last_acc']:.2f} % (last epoch, {teacher['epochs']} epochs, seed 0). "
                f"Students: {args.epochs} epochs, CIFAR-10 image folder, 5,000-image subset, full 10,000-image "
                f"test split, `--amp {args.amp}`, {args.threads} thread(s) per run, {args.jobs} runs at a time.\n\n")
    table = head + "\n".join(lines) + "\n\n" + "\n".join(comparison_lines(out, args.students)) + "\n"
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

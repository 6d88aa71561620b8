"""The CPU evidence table on the papers' architecture family: tv_resnet34 -> tv_resnet18 on CIFAR-10
photographs at 64 px, with the mini-benchmark's discipline (benchmarks/mini_benchmark.py, whose machinery
this reuses): a class-balanced training subset, the full 10,000-image test split, last-epoch accuracy, the
weight-matched CE + KD control, seeds.

Protocol [choice, each a flag below]:
- Data: the CIFAR-10 image folder (`--dataset folder`), kept on the device at its own 32 x 32
  (`--pipeline device --store-size 32`) and upsampled to 64 px by each training sample's RandomResizedCrop
  (torchvision's scale 0.08-1 and flip, the ImageNet augmentation of the papers), test images by a bilinear
  resize to 64. Measured on this 2-core CPU (1 thread, bf16, tv_resnet18 alone, 2,000 images, 1 epoch): the
  device pipeline trained at 139 images/s, the streamed one (`--pipeline stream --workers 0`) at 131; the
  device pipeline also needs no decoding process beside the run.
- Teacher: tv_resnet34 trained from scratch, once, seed 0, on a 20,000-image class-balanced subset (a
  superset of the students' 5,000: `balanced_subset` draws the same order per class) for 10 epochs, so that
  it is clearly better than the students (more data, not only more epochs), then passed with --teacher-ckpt.
- Students: tv_resnet18, 5,000-image subset, 15 epochs, the cifar cnn recipe (SGD lr 0.05, batch 64,
  x0.1 at 9/11/13), evaluated at the last epoch only (`--eval-every 15`: a test pass of 10,000 images at
  64 px costs about 20 s of a 36-120 s epoch; the table's accuracy is the last epoch's anyway).
- Rows: the mini-benchmark's rows of the same names (same flags); SSKD with sskd.py's default split.
- Order: seed 0 of every row first, then seeds 1 and 2 of the rows compared with the control (`--seeded-rows`).

    mkdir -p ~/data/cifar10 && tar -xzf ../shared/data/cifar10_jpeg.tar.gz -C ~/data/cifar10
    OMP_NUM_THREADS=1 nohup python benchmarks/papers_benchmark.py > runs/papers.log 2>&1 &   # resumable
    python benchmarks/papers_benchmark.py --table-only            # the table so far, in runs/papers/table.md

SSKD's budget (`--rows sskd_s6_h2 sskd_s10_h2`: 6 or 10 epochs per stage, 2 for the head), and what limits a
finished SSKD run, its stages or its head: benchmarks/sskd_probe.py.

On one GPU the same protocol at 224 px (benchmarks/README.md's 224-px table: an H200, every run of a call at
once, about 4 minutes per call of 14 runs; the teacher first, alone, 1.5 minutes):

    python benchmarks/papers_benchmark.py --image-size 224 --out runs/papers224 --jobs 14 --threads 2 \
        --rows student kd cekd blockkd lfcc sskd sskd_unnormalised sskd_clip --seeds 0 1 2 3 4 \
        --seeded-rows student kd cekd blockkd lfcc sskd sskd_unnormalised

Every run gets --resume and a run whose summary.json exists is skipped: stop it at any time and rerun the same
command. One run at a time by default (`--jobs`), one thread each (`--threads`).
"""
import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mini_benchmark as mini  # noqa: E402
from mini_benchmark import ROOT, ROWS, mean_std, run, say, wall_seconds  # noqa: E402

TEACHER, STUDENT = "tv_resnet34", "tv_resnet18"
PAPERS_ROWS = {  # the mini-benchmark's rows, SSKD at sskd.py's defaults (its 4 stages split the epochs)
    **{row: ROWS[row] for row in ("student", "kd", "cekd", "blockkd", "lfcc")},
    "sskd": ("sskd.py", [], "SSKD as in the paper (stages, then head on labels)"),
    "sskd_unnormalised": ("sskd.py", ["--feat-norm", "none"],
                          "SSKD, plain MSE × 10 (`--feat-norm none`, the old default)"),
    "sskd_clip": ("sskd.py", ["--feat-norm", "none", "--grad-clip", "1"],
                  "SSKD, plain MSE × 10, gradient norm clipped at 1 (`--feat-norm none --grad-clip 1`)"),
    # SSKD's budget at this size: epochs per stage phase (s) and of the head phase (h); s3_h1 is the default.
    "sskd_s6_h2": ("sskd.py", ["--stage-epochs", "6", "--head-epochs", "2"], "SSKD as in the paper"),
    "sskd_s10_h2": ("sskd.py", ["--stage-epochs", "10", "--head-epochs", "2"], "SSKD as in the paper"),
}
DEFAULT_ROWS = ["student", "kd", "cekd", "blockkd", "lfcc", "sskd"]
SEEDED_ROWS = ["cekd", "blockkd", "lfcc", "sskd"]
COMPARISONS = [("kd", "student"), ("cekd", "student"), ("blockkd", "cekd"), ("lfcc", "cekd"),
               ("sskd", "student"), ("sskd", "cekd"), ("sskd", "sskd_unnormalised"), ("sskd_clip", "sskd")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path.home() / "data" / "cifar10"), help="the unpacked image folder")
    parser.add_argument("--out", default="runs/papers", help="where the runs and table.md go (default runs/papers)")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(PAPERS_ROWS), metavar="ROW",
                        help=f"rows (default: {' '.join(DEFAULT_ROWS)}); all: {' '.join(PAPERS_ROWS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds (default 0 1 2); seeds other than the first only for --seeded-rows")
    parser.add_argument("--seeded-rows", nargs="*", default=SEEDED_ROWS, choices=list(PAPERS_ROWS), metavar="ROW",
                        help=f"rows run with every seed (default: {' '.join(SEEDED_ROWS)})")
    parser.add_argument("--image-size", type=int, default=64, help="input side (default 64)")
    parser.add_argument("--train-subset", type=int, default=5000, help="students' training images (default 5000)")
    parser.add_argument("--epochs", type=int, default=15, help="student epochs (default 15)")
    parser.add_argument("--teacher-subset", type=int, default=20000, help="teacher's training images (default 20000)")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="teacher epochs (default 10)")
    parser.add_argument("--amp", choices=["bf16", "off"], default="bf16", help="passed to every run (default bf16)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--teacher-only", action="store_true", help="train (or finish) the teacher and stop")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args()
    out = ROOT / args.out
    data = ["--dataset", "folder", "--data-dir", args.data_dir, "--image-size", str(args.image_size),
            "--pipeline", "device", "--store-size", "32", "--amp", args.amp]
    teacher_dir = out / f"teacher_{TEACHER}"
    failed = 0
    if not args.table_only:
        if not (teacher_dir / "summary.json").exists():
            command = [sys.executable, "common.py", "--model", TEACHER, *data, "--train-subset",
                       str(args.teacher_subset), "--epochs", str(args.teacher_epochs), "--eval-every", "5",
                       "--seed", "0", "--out-dir", str(teacher_dir), "--resume"]
            if run(command, teacher_dir, args.threads) is None:
                sys.exit("the teacher failed; nothing else was run")
        if args.teacher_only:
            return
        todo = []
        for i, seed in enumerate(args.seeds):
            for row in args.rows:
                run_dir = out / f"{row}_{STUDENT}_seed{seed}"
                if (i > 0 and row not in args.seeded_rows) or (run_dir / "summary.json").exists():
                    continue
                script, flags, _ = PAPERS_ROWS[row]
                models = ["--model", STUDENT] if script == "common.py" else \
                    ["--teacher", TEACHER, "--student", STUDENT, "--teacher-ckpt", str(teacher_dir / "model.pth")]
                todo.append(([sys.executable, script, *models, *flags, *data, "--train-subset",
                              str(args.train_subset), "--epochs", str(args.epochs), "--eval-every",
                              str(args.epochs), "--seed", str(seed), "--out-dir", str(run_dir), "--resume"],
                             run_dir))
        say(f"{len(todo)} runs to do, {args.jobs} at a time")
        with ThreadPoolExecutor(args.jobs) as pool:  # started in order: seed 0 of every row first
            failed = sum(r is None for r in pool.map(lambda job: run(*job, args.threads), todo))
    write_table(out, args)
    if failed:
        sys.exit(f"{failed} runs failed (see their output.txt); rerun the same command to retry them")


def write_table(out, args):
    mini.ROWS = PAPERS_ROWS  # mini.label and mini.comparison_lines read the labels and runs through these
    mini.COMPARISONS = COMPARISONS
    teacher_file = out / f"teacher_{TEACHER}" / "summary.json"
    teacher = json.loads(teacher_file.read_text()) if teacher_file.exists() else None
    lines = ["| teacher → student | row | seeds | last-epoch acc % | s / run (median) |", "|---|---|---|---|---|"]
    for row in PAPERS_ROWS:
        runs = sorted(out.glob(f"{row}_{STUDENT}_seed*/summary.json"))
        if not runs:
            continue
        summaries = [json.loads(p.read_text()) for p in runs]
        walls = [w for w in (wall_seconds(p.parent) for p in runs) if w is not None]
        seeds = ",".join(p.parent.name.rsplit("seed", 1)[1] for p in runs)
        wall = f"{statistics.median(walls):.0f}" if walls else "–"
        lines.append(f"| {TEACHER} → {STUDENT} | {mini.label(row, summaries[0])} | {seeds} | "
                     f"{mean_std([s['last_acc'] for s in summaries])} | {wall} |")
    head = ""
    if teacher:
        head = (f"Teacher {TEACHER}: {teacher['last_acc']:.2f} % (from scratch, {args.teacher_subset} images, "
                f"{teacher['epochs']} epochs, seed 0). Students {STUDENT}: {args.epochs} epochs, CIFAR-10 image "
                f"folder at {args.image_size} px, {args.train_subset}-image subset, full 10,000-image test split, "
                f"last epoch, `--amp {args.amp}`.\n\n")
    table = head + "\n".join(lines) + "\n\n" + "\n".join(mini.comparison_lines(out, [STUDENT])) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

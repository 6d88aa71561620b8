"""Fixed-seed CPU runs of every script, to prove that a change which should not change results does not.

Runs a fixed set of short commands (synthetic data and a generated image folder, fixed seeds, one thread)
with the scripts of a checkout, and writes what they trained: each run's metrics.jsonl and summary.json
accuracies without timings, and a SHA-1 of every tensor of model.pth and of the teachers it saved. Run it
on the commit before a change and after it, then compare:

    git worktree add /tmp/before HEAD~1
    python benchmarks/same_results.py --repo /tmp/before --out /tmp/same/before
    python benchmarks/same_results.py --out /tmp/same/after
    python benchmarks/same_results.py --compare /tmp/same/before /tmp/same/after   # exit 1 on a difference

A change of a default is checked the same way with the old value given: `--append sskd '--feat-norm none'`.

The runs: a common.py model saved as a teacher; the KD baseline and Block-KD from it; SSKD's four phases;
LFCC with the zoo Mixer; a teacher trained automatically by a method run; a streamed image-folder run; a
2-rank gloo run under torchrun. About 2 minutes on 2 cores. Keys a newer version adds to a row are listed,
not counted as differences; a value that differs, or a key that disappears, is.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = "--dataset synthetic --train-subset 200 --batch-size 50 --seed 3"
RUNS = {  # name -> command, run in --out with the scripts of --repo
    "teacher": f"common.py --model resnet8 {TINY} --epochs 2 --out-dir teacher --save-as-teacher",
    "kd": f"blockwise_kd.py --teacher resnet8 --teacher-epochs 2 --student resnet8 {TINY} --epochs 2 "
          "--stones none --gamma 0 --alpha 0.1 --beta 0.9 --out-dir kd",
    "blockkd": f"blockwise_kd.py --teacher resnet8 --teacher-epochs 2 --student resnet8 {TINY} --epochs 2 "
               "--out-dir blockkd",
    "sskd": f"sskd.py --teacher resnet8 --teacher-epochs 2 --student resnet8 {TINY} --stage-epochs 1 "
            "--head-epochs 1 --out-dir sskd",
    "lfcc": f"lfcc.py --teacher resnet8 --teacher-epochs 2 --student mlp_mixer {TINY} --epochs 2 --out-dir lfcc",
    "auto_teacher": f"blockwise_kd.py --teacher resnet14 --teacher-epochs 1 --student resnet8 {TINY} --epochs 1 "
                    "--out-dir auto_teacher",
    "streamed": "blockwise_kd.py --teacher tv_resnet18 --teacher-epochs 1 --student tv_resnet18 --dataset folder "
                "--data-dir images --pipeline stream --workers 0 --image-size 32 --batch-size 8 --epochs 1 "
                "--out-dir streamed",
    "torchrun": f"-m torch.distributed.run --nproc_per_node 2 lfcc.py --teacher resnet8 --teacher-epochs 2 "
                f"--student mlp_mixer {TINY} --epochs 1 --out-dir torchrun",
}
TIMINGS = {"seconds", "images_per_sec", "mean_images_per_sec"}


def make_image_folder(root):
    """images/{train,test}/<class>/*.png: 2 classes, 12 training and 4 test images of 20-60 px, fixed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(20, 60, 2))
                pixels = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
                pixels[..., c] = 255
                Image.fromarray(pixels).save(folder / f"{i}.png")


def tensor_digests(path):
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    return {k: hashlib.sha1(v.contiguous().numpy().tobytes()).hexdigest()[:16] for k, v in state.items()}


def record(folder):
    """What a run folder holds of its results: every metrics.jsonl (timings removed), summary accuracies, and
    the model.pth tensors' digests, by path inside the folder."""
    found = {}
    for path in sorted(folder.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        found[str(path.relative_to(folder))] = [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]
    for path in sorted(folder.rglob("summary.json")):
        summary = json.loads(path.read_text())
        found[str(path.relative_to(folder))] = {k: summary.get(k) for k in ("last_acc", "best_acc", "best_epoch")}
    for path in sorted(folder.rglob("model.pth")):
        found[str(path.relative_to(folder))] = tensor_digests(path)
    return found


def run_all(repo, out, appended=()):
    out.mkdir(parents=True, exist_ok=True)
    for entry in ("common.py", "blockwise_kd.py", "sskd.py", "lfcc.py", "models", "plumbing"):
        link = out / entry
        if (repo / entry).exists() and not link.exists():  # (plumbing/: from the core's split on)
            link.symlink_to(repo / entry)
    make_image_folder(out / "images")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    results = {}
    for name, command in RUNS.items():
        command += "".join(f" {flags}" for run, flags in appended if run == name)
        print(f"{name}: python {command}", flush=True)
        done = subprocess.run([sys.executable, *command.split()], cwd=out, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"error: {name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        results[name] = record(out / name)
    results["teachers"] = {str(p.relative_to(out)): tensor_digests(p) for p in sorted((out / "checkpoints").rglob("*.pth"))}
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"wrote {out / 'results.json'}")


def compare(before, after):
    """Every value of `before` equal in `after` (new keys in a row allowed); prints each difference."""
    old, new = (json.loads((Path(p) / "results.json").read_text()) for p in (before, after))
    differences, added = [], set()

    def walk(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            added.update(f"{where}/{k}" for k in set(b) - set(a))
            for k in a:
                if k not in b:
                    differences.append(f"{where}/{k}: missing")
                else:
                    walk(a[k], b[k], f"{where}/{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}[{i}]")
        elif a != b:
            differences.append(f"{where}: {a!r} -> {b!r}")
    walk(old, new, "")
    new_keys = sorted({k.rsplit("/", 1)[-1] for k in added})
    print(f"{len(differences)} differences; keys only in {after}: {', '.join(new_keys) or 'none'}")
    for line in differences[:50]:
        print("  " + line)
    return not differences


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose scripts run (default: this one)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "same_results", help="where the runs go")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two --out folders")
    parser.add_argument("--append", nargs=2, action="append", default=[], metavar=("RUN", "FLAGS"),
                        help="append FLAGS to RUN's command (repeatable): a new flag's old value, to show that it "
                             "gives the runs before the change, e.g. --append sskd '--feat-norm none'")
    args = parser.parse_args()
    if args.compare:
        sys.exit(0 if compare(*args.compare) else 1)
    unknown = {run for run, _ in args.append} - set(RUNS)
    if unknown:
        parser.error(f"--append: no run named {', '.join(sorted(unknown))} (runs: {', '.join(RUNS)})")
    run_all(args.repo.resolve(), args.out.resolve(), args.append)


if __name__ == "__main__":
    main()

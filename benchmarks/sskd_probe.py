"""What limits a finished SSKD run's accuracy: its body (the stages that mimic the teacher's) or its head.

For an SSKD run folder (model.pth, run.json) and the teacher it distilled, on the run's test split:
- the student as trained (its own head, trained in phase B on labels);
- the teacher's own head on the student's last stage output: the accuracy the mimicked features would give
  if they were the teacher's (no head training at all);
- the teacher itself;
- each stage's test feature MSE relative to the teacher's mean squared stage output (E_k), the student's
  stages fed by its own earlier stages, as in the run.
For pairs whose stage outputs have the teacher's shapes (no adapters: they are dropped after their phase) and
runs without --teacher-input. A body that mimics well gives the teacher's head nearly the teacher's accuracy;
a head that is the limit leaves the student below the teacher's head on its features.

    python benchmarks/sskd_probe.py runs/papers/sskd_tv_resnet18_seed0 --teacher-ckpt \\
        runs/papers/teacher_tv_resnet34/model.pth
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import sskd  # noqa: E402
from models import create_model, stage_features  # noqa: E402
from plumbing.weights import load_weights  # noqa: E402


@torch.no_grad()
def probe(run_dir, teacher_ckpt, data_dir, threads=1, test_subset=0):
    """{name: accuracy %, ...} of the SSKD run in run_dir (see the module's docstring), on its data as
    run.json records it (the training subset gives the normalisation), all or `test_subset` of the test
    images, on the CPU in fp32."""
    torch.set_num_threads(threads)
    flags = json.loads((run_dir / "run.json").read_text())["config"]
    parser = argparse.ArgumentParser()
    common.add_common_args(parser)
    sizes = [f"--{k.replace('_', '-')}={flags[k]}" for k in ("image_size", "store_size") if flags.get(k)]
    args = parser.parse_args(["--dataset", flags["dataset"], "--data-dir", str(data_dir), "--train-subset",
                              str(flags["train_subset"]), "--test-subset", str(test_subset), "--pipeline",
                              "device", "--device", "cpu", *sizes])
    data = common.load_data(args, torch.device("cpu"))
    student = create_model(flags["student"], data.num_classes).eval()
    teacher = create_model(flags["teacher"], data.num_classes).eval()
    shapes = sskd.stage_shapes(student, teacher, data.image_size)
    if flags.get("teacher_input") or any(s != t for s, t in shapes):
        raise SystemExit(f"error: {run_dir} is not a run this probe reads: it compares the student's stages with "
                         "the teacher's as they are, so it needs stage outputs of the teacher's shapes (these: "
                         f"{shapes}) and a run without --teacher-input")
    load_weights(student, run_dir / "model.pth")
    load_weights(teacher, teacher_ckpt)
    correct = {"student": 0, "teacher head on student body": 0, "teacher": 0}
    squared, energy = [0.0] * len(shapes), [0.0] * len(shapes)  # sums over the images of per-image means
    for x, y in data.test_batches(250):
        s_feats, s_logits = stage_features(student, x)
        t_feats, t_logits = stage_features(teacher, x)
        correct["student"] += (s_logits.argmax(1) == y).sum().item()
        correct["teacher head on student body"] += (teacher.head()(s_feats[-1]).argmax(1) == y).sum().item()
        correct["teacher"] += (t_logits.argmax(1) == y).sum().item()
        for k, (s, t) in enumerate(zip(s_feats, t_feats)):
            squared[k] += (s - t).pow(2).sum().item() / s[0].numel()
            energy[k] += t.pow(2).sum().item() / t[0].numel()
    n = len(data.test_y)
    result = {name: round(100 * c / n, 2) for name, c in correct.items()}
    result["stage MSE"] = [float(f"{e / n:.4g}") for e in squared]
    result["E_k on the test images"] = [float(f"{t / n:.4g}") for t in energy]
    result["stage MSE / E_k (%)"] = [round(100 * e / t, 1) for e, t in zip(squared, energy)]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished SSKD run folders")
    parser.add_argument("--teacher-ckpt", type=Path, required=True, help="the teacher the runs distilled")
    parser.add_argument("--data-dir", type=Path, default=Path.home() / "data" / "cifar10",
                        help="the runs' data folder (default ~/data/cifar10)")
    parser.add_argument("--test-subset", type=int, default=0, help="a class-balanced part of the test images "
                        "(default 0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    for run_dir in args.runs:
        result = probe(run_dir, args.teacher_ckpt, args.data_dir, args.threads, args.test_subset)
        print(run_dir.name, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

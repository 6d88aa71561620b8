"""benchmarks/gpu_check.py on the CPU: its table, its time budget, a failing config among others.

benchmarks/gpu_check.py on the CPU: its table for one pair's methods (a subprocess, one thread), the budget's
skips and cut, one failing config among others, its 2-epoch part, and its torchrun and compile parts. The
table and those two parts are marked slow: CI runs them beside the default suite."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

SMALL = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--image-size", "32", "--batch-size", "4"]
R34_R18 = ["--pairs", "tv_resnet34:tv_resnet18"]


def run_check(tmp_path, *argv, timeout=300):
    """gpu_check.py in a subprocess with one thread; (stdout, the rows of its --out JSON, its markdown)."""
    out = tmp_path / "check.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *SMALL, *argv, "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(out.with_suffix(".json").read_text()), out.read_text()


def assert_measured(row):
    expected = "expected: a new head on an untrained, frozen backbone" if row["method"] == "sskd_head" else ""
    assert row["note"] in ("", expected) and row["steps"] == 2 and row["images_per_s"] > 0, row
    assert row["finite"] and math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"]), row


@pytest.mark.slow  # in CI's second job, which has the time to spare
def test_eager_table_of_one_pair(tmp_path):
    stdout, rows, markdown = run_check(tmp_path, *R34_R18, "--parts", "eager")
    assert [r["method"] for r in rows] == ["kd", "blockkd", "sskd_stage", "sskd_head"]
    for row in rows:
        assert row["part"] == "eager" and row["px"] == 32 and row["batch"] == 4
        assert_measured(row)
        assert gpu_check.markdown_row(row) in stdout and gpu_check.markdown_row(row) in markdown
    assert "| eager | Block-KD | tv_resnet34 → tv_resnet18 | 32 | 4 | 2 |" in markdown
    for part in ("torchrun", "two-epoch", "compile"):
        assert f"{part}: not run" in markdown


def test_no_budget_skips_every_config_and_still_writes_the_table(tmp_path):
    _, rows, markdown = run_check(tmp_path, "--budget-seconds", "0.001")
    configs = [(m, t, s) for (t, s), methods in gpu_check.PAIRS.items() for m in methods]
    steps = [r for r in rows if r["table"] == "steps"]
    assert [(r["method"], r["teacher"], r["student"]) for r in steps if r["part"] == "eager"] == configs
    assert {r["part"] for r in steps} == {"eager", "torchrun, 1 rank"}
    assert [r["method"] for r in rows if r["table"] == "epochs"] == ["kd", "blockkd"]
    assert all(r["note"].startswith("skipped: needs ~") for r in rows), rows
    assert markdown.count("skipped: needs ~") == len(rows) and "compile: not run" in markdown


def small_args(*argv):
    return gpu_check.parse_args(["--device", "cpu", "--image-size", "32", "--batch-size", "2", *argv])


def test_a_config_past_the_deadline_is_cut_after_one_step():
    args = small_args("--warmup", "0", "--steps", "5")
    row = gpu_check.measure(("sskd_head", "tv_resnet34", "tv_resnet18"), "eager", args, torch.device("cpu"),
                            gpu_check.Budget(time.time() - 1))
    assert row["steps"] == 1 and row["images_per_s"] > 0 and row["finite"]
    assert row["note"] == "cut at the budget's end after 1 steps"


def test_a_failing_config_is_one_row_and_the_others_go_on(monkeypatch):
    def measure(config, part, args, device, budget):
        if config[0] == "blockkd":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")
        if config[0] == "sskd_stage":
            raise SystemExit("error: a refused flag")
        return gpu_check.step_row(config, part, args, "measured")
    monkeypatch.setattr(gpu_check, "measure", measure)
    rows, budget = [], gpu_check.Budget(time.time() + 60)
    configs = [(m, "tv_resnet34", "tv_resnet18") for m in ("kd", "blockkd", "sskd_stage", "sskd_head")]
    gpu_check.run_configs(configs, "eager", small_args(), torch.device("cpu"), budget, rows.append)
    assert [r["note"] for r in rows] == [
        "measured", "failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "failed: SystemExit: error: a refused flag", "measured"]
    assert len(budget.taken["eager"]) == 4


def test_the_budget_uses_the_longest_config_of_its_kind():
    budget = gpu_check.Budget(time.time() + 30)
    assert budget.skip_reason("eager") is None  # the first guess, 20 s, fits in 30
    budget.record("eager", 5)
    budget.record("eager", 40)
    assert budget.skip_reason("eager").startswith("skipped: needs ~40 s")
    assert budget.skip_reason("compile").startswith("skipped: needs ~60 s")


@pytest.mark.slow  # beside the README's commands in CI's second job: the two parts split the jobs' time
def test_torchrun_part(tmp_path):
    _, rows, _ = run_check(tmp_path, *R34_R18, "--methods", "kd", "--parts", "torchrun", timeout=600)
    (step,) = rows
    assert step["part"] == "torchrun, 1 rank, gloo DDP" and step["method"] == "kd"
    assert_measured(step)
    assert (tmp_path / "check_logs" / "torchrun.log").exists()


def test_two_epoch_part(tmp_path):
    _, rows, _ = run_check(tmp_path, "--parts", "two-epoch", "--two-epoch-images", "100", "--two-epoch-test-images",
                           "100", timeout=600)
    kd, blockkd = rows
    for row, method in ((kd, "kd"), (blockkd, "blockkd")):
        assert row["table"] == "epochs" and row["method"] == method and row["device"] == "cpu", row
        assert row["note"] == "" and 0 <= row["test_acc"] <= 100 and math.isfinite(row["train_loss"]), row


@pytest.mark.slow
def test_compile_part(tmp_path):
    _, rows, _ = run_check(tmp_path, *R34_R18, "--methods", "sskd_head", "--parts", "compile", "--compile-backend",
                           "aot_eager", timeout=600)  # inductor on the CPU: test_fast_paths.py's `alone` case
    (row,) = rows
    assert row["part"] == "compile (aot_eager)" and row["method"] == "sskd_head"
    assert_measured(row)

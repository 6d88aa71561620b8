"""torchrun (plumbing/distributed.py) on CPU, gloo, 2 ranks: they train as one process, stops are rank 0's line.

torchrun / DistributedDataParallel on CPU (gloo, 2 processes): two ranks train as one process does, a
checkpoint moves between world sizes, the shards are exactly the epoch, and under torchrun a stop or a refusal
is rank 0's one line.

One fork of 2 worker processes (torch.multiprocessing, a file rendezvous) runs every 2-rank training case of
this file; the single-process references run in the test process. The students have no BatchNorm (the tiny
MLP-Mixer) and the teachers are frozen, so that 2 ranks and 1 process compute the same gradients."""
import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import blockwise_kd as bkd
import common
import lfcc
from conftest import ROOT, TINY, data_slice, frozen, make_args, make_imagenet_folder, read_summary, tiny_model

WORLD = 2
KD = ["--stones", "none", "--gamma", 0, "--alpha", 0.1, "--beta", 0.9]
CASES = {  # name -> (method module, teacher, method flags)
    "kd": (bkd, "resnet8", KD),
    "blockkd": (bkd, "vit", []),  # a token teacher: the connectors are Linear + LayerNorm, no BatchNorm
    "lfcc": (lfcc, "resnet8", []),
    "lfcc_local_negatives": (lfcc, "resnet8", ["--local-negatives"]),
}


class Killed(BaseException):
    """Stands for SIGKILL at the first step of epoch 2, on every rank alike."""


def train(case, data, out_dir, *extra, kill_in_epoch_2=False):
    """The student of one case after 2 epochs of 99 images, batch 32 (the last batch, 3 images, splits 2 + 1
    over two ranks), from fixed initialisations; with kill_in_epoch_2 it stops after epoch 1's checkpoint."""
    module, teacher_name, flags = CASES[case]
    args = make_args("--dataset", "synthetic", "--epochs", 2, "--batch-size", 32, "--out-dir", out_dir, *flags,
                     *extra, method_args=module.add_args)
    teacher, student = frozen(tiny_model(teacher_name, seed=0)), tiny_model("mlp_mixer", seed=1)
    learning_rate = common.learning_rate

    def dies_in_epoch_2(recipe, progress):
        if kill_in_epoch_2 and progress >= 1:
            raise Killed
        return learning_rate(recipe, progress)
    common.learning_rate = dies_in_epoch_2
    try:
        module.distill(args, data, teacher, student)
    except Killed:
        pass
    finally:
        common.learning_rate = learning_rate
    return student.state_dict()


def gathered_info_nce(z_student, z_teacher):
    """This rank's rows of a fixed pair of embedding batches (5 rows: 3 on rank 0, 2 on rank 1): the InfoNCE
    over all of them and its gradient with respect to this rank's rows."""
    rows = slice(0, 3) if common.rank() == 0 else slice(3, 5)
    z_s, z_t = z_student[rows].clone().requires_grad_(), z_teacher[rows].clone().requires_grad_()
    loss, accuracy = lfcc.info_nce(z_s, z_t, 0.1)
    loss.backward()
    return loss.detach(), accuracy, z_s.grad, z_t.grad


def worker(rank, data, folder, z_student, z_teacher, streamed):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    results = {"info_nce": gathered_info_nce(z_student, z_teacher)}
    for case in CASES:
        results[case] = train(case, data, folder / case)
    real_distributed_loss = common.distributed_loss
    common.distributed_loss = lambda train_modules, loss_fn, device, sync_bn: loss_fn  # no gradient averaging
    results["kd_without_ddp"] = train("kd", data, folder / "kd_without_ddp")
    common.distributed_loss = real_distributed_loss
    results["resumed_on_2"] = train("kd", data, folder / "killed_on_1", "--resume")
    results["kd_streamed"] = train("kd", streamed, folder / "kd_streamed")
    train("kd", data, folder / "killed_on_2", kill_in_epoch_2=True)
    common.main([str(a) for a in ("--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", folder / "saved_teacher",
                                  "--checkpoint-dir", folder / "checkpoints", "--save-as-teacher")])
    torch.save(results, folder / f"results{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(synthetic_data, tmp_path_factory):
    """The single-process references, then every 2-rank case in one fork: ({case: weights}, {case: weights
    of rank 0 and 1}, the embeddings of the InfoNCE case, the run folders)."""
    folder = tmp_path_factory.mktemp("distributed")
    data = data_slice(synthetic_data, 99, 50)
    single = {case: train(case, data, folder / f"single_{case}") for case in CASES}
    # The streamed pipeline: 99 JPEGs of several sizes, decoded in the training process, at 32 px.
    images = make_imagenet_folder(folder / "imagenet", 33, 4)
    streamed = common.load_data(make_args("--dataset", "imagenet", "--data-dir", images, "--image-size", 32,
                                          "--workers", 0), torch.device("cpu"))
    single["kd_streamed"] = train("kd", streamed, folder / "single_kd_streamed")
    train("kd", data, folder / "killed_on_1", kill_in_epoch_2=True)  # for the 2 ranks to resume
    common.session.folder_locks.pop((folder / "killed_on_1").resolve()).release()  # as if this process had ended
    g = torch.Generator().manual_seed(0)
    z_student = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    z_teacher = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    # Forked, not spawned: the workers start with torch and these modules imported (about 5 s less CPU).
    mp.start_processes(worker, args=(data, folder, z_student, z_teacher, streamed), nprocs=WORLD, join=True,
                       start_method="fork")
    ranks = [torch.load(folder / f"results{r}.pt", weights_only=True) for r in range(WORLD)]
    return single, ranks, (z_student, z_teacher), folder, data


def largest_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("case", ["kd", "blockkd", "lfcc", "kd_streamed"])
def test_two_ranks_train_as_one_process(case, runs):
    single, ranks, _, folder, _ = runs
    assert largest_difference(ranks[0][case], ranks[1][case]) == 0  # DDP keeps the replicas identical
    assert largest_difference(single[case], ranks[0][case]) < 2e-4  # float32 rounding (AdamW after 8 steps)
    summary = read_summary(folder / case)
    assert (summary["world_size"], summary["backend"]) == (2, "gloo")
    assert summary["last_epoch"]["train_loss"] == pytest.approx(
        read_summary(folder / f"single_{case}")["last_epoch"]["train_loss"], rel=1e-4)


def test_the_equivalence_check_fails_without_gradient_averaging_or_with_per_rank_negatives(runs):
    """What makes the previous test a test: without DDP's averaging the ranks drift apart and away from the
    single process; LFCC with each rank's own negatives is another objective."""
    single, ranks, *_ = runs
    assert largest_difference(ranks[0]["kd_without_ddp"], ranks[1]["kd_without_ddp"]) > 1e-3
    assert largest_difference(single["kd"], ranks[0]["kd_without_ddp"]) > 1e-3
    assert largest_difference(single["lfcc"], ranks[0]["lfcc_local_negatives"]) > 1e-3


def test_the_gathered_info_nce_is_the_single_process_info_nce_of_the_whole_batch(runs):
    _, ranks, (z_student, z_teacher), *_ = runs
    z_s, z_t = z_student.clone().requires_grad_(), z_teacher.clone().requires_grad_()
    loss, accuracy = lfcc.info_nce(z_s, z_t, 0.1)
    loss.backward()
    (loss_0, accuracy_0, grad_s0, grad_t0), (loss_1, accuracy_1, grad_s1, grad_t1) = ranks[0]["info_nce"], \
        ranks[1]["info_nce"]
    torch.testing.assert_close(loss_0, loss.detach())
    torch.testing.assert_close(loss_1, loss.detach())
    assert accuracy_0 == accuracy_1 == accuracy
    # Each rank computes the whole loss, so a row's gradient arrives once from every rank: WORLD times the
    # single-process gradient, which DDP's averaging over the ranks divides back.
    torch.testing.assert_close(torch.cat([grad_s0, grad_s1]) / WORLD, z_s.grad)
    torch.testing.assert_close(torch.cat([grad_t0, grad_t1]) / WORLD, z_t.grad)


def test_save_as_teacher_on_two_ranks_saves_rank_0s_model_pth(runs):
    """Rank 0 alone writes model.pth; the other ranks wait for its copy into the teacher cache instead of
    reading a model.pth that may not exist yet."""
    folder = runs[3]
    [teacher] = (folder / "checkpoints").glob("*/resnet8_1ep.pth")
    assert teacher.read_bytes() == (folder / "saved_teacher" / "model.pth").read_bytes()


def test_the_batch_split_check_knows_the_recipe_of_a_teacher_still_to_train(monkeypatch, synthetic_data):
    """Under torchrun, the batch of a teacher that is trained first is its recipe row's (setting, family); a
    torchvision teacher of 1000 classes is used as it is, nothing to train."""
    monkeypatch.setattr(common, "world_size", lambda: 2)
    data = data_slice(synthetic_data, 129, 10)  # 129 = 128 + 1: the ofa recipe's teacher batch leaves 1 image
    args = make_args("--teacher", "tv_resnet34", "--student", "tv_resnet18", "--dataset", "cifar100",
                     "--image-size", 224, "--batch-size", 6, "--checkpoint-dir", "nowhere")
    assert common.teacher_source(args, data) == ("train", common.teacher_candidates(args, data)[0])
    with pytest.raises(SystemExit, match="the last batch of an epoch holds 1 images .* change --train-subset or the "
                                         "teacher's batch"):
        common.check_batch_split(args, data, "blockwise_kd", True)
    common.check_batch_split(args, data_slice(synthetic_data, 130, 10), "blockwise_kd", True)
    args = make_args("--teacher", "tv_resnet34", "--teacher-weights", "IMAGENET1K_V1", "--student", "tv_resnet18")
    assert common.teacher_source(args, argparse.Namespace(num_classes=1000)) == ("torchvision", None)


def test_a_one_process_checkpoint_resumes_on_two_ranks(runs):
    single, ranks, _, folder, _ = runs
    assert largest_difference(single["kd"], ranks[0]["resumed_on_2"]) < 2e-4
    summary = read_summary(folder / "killed_on_1")  # epoch 1 in one process, epoch 2 on two ranks
    assert summary["world_size"] == 2 and summary["world_sizes"] == {"1": 1, "2": 1}


def test_a_two_rank_checkpoint_resumes_in_one_process(runs):
    single, _, _, folder, data = runs
    assert torch.load(folder / "killed_on_2" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = train("kd", data, folder / "killed_on_2", "--resume")
    assert largest_difference(single["kd"], resumed) < 2e-4


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_ranks_shards_are_exactly_the_epoch_and_the_test_set(world, synthetic_data):
    data = data_slice(synthetic_data, 101, 1002)  # last train batch: 5 images; last test batch: 2 (< 3, 4)
    whole = list(data.train_batches(32, seed=0, epoch=1))
    shards = [list(data.train_batches(32, seed=0, epoch=1, shard=(r, world))) for r in range(world)]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([shard[step][0] for shard in shards]), x)
        assert torch.equal(torch.cat([shard[step][1] for shard in shards]), y)
        sizes = [len(shard[step][1]) for shard in shards]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    tests = [list(data.test_batches(shard=(r, world))) for r in range(world)]
    assert len({len(t) for t in tests}) == 1 and all(len(y) for t in tests for _, y in t)  # no rank empty
    assert torch.equal(torch.cat([y for step in zip(*tests) for _, y in step]), data.test_y)


def torchrun(*argv, cwd):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={WORLD}", *map(str, argv)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_under_torchrun_sigterm_and_a_refusal_are_rank_0s_one_line(tmp_path):
    """SIGTERM to torchrun (a scheduler's pre-emption) stops both ranks with rank 0's line and the torchrun
    command that resumes; the same command again is refused in one line, and both ranks end with exit 1."""
    command = [ROOT / "common.py", "--model", "resnet8", *TINY, "--epochs", 50, "--out-dir", "run", "--device", "cpu"]
    run = torchrun(*command, cwd=tmp_path)
    while not (tmp_path / "run" / "checkpoint.pt").exists() and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode != 0, out
    lines = out.strip().splitlines()
    assert sum(line.startswith("data: synthetic") for line in lines) == 1  # rank 0 alone logs
    assert lines[-1].startswith("interrupted (SIGTERM): the last complete checkpoint is run/checkpoint.pt")
    assert lines[-1].endswith(f"to resume: torchrun --nproc_per_node={WORLD} {ROOT / 'common.py'} --model resnet8 "
                              f"{' '.join(TINY)} --epochs 50 --out-dir run --device cpu --resume")
    start = time.time()
    refused = torchrun(*command, cwd=tmp_path)
    out, err = refused.communicate(timeout=120)
    assert refused.returncode == 1 and out == "" and time.time() - start < 60
    ours = [line for line in err.splitlines() if line.startswith("error:")]  # torchrun adds its own report
    assert ours == [ours[0]] and ours[0].startswith("error: run already holds a run (checkpoint.pt")


def rank_pid(torchrun_pid, local_rank):
    """The pid of the worker process of `local_rank` that torchrun started."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().split()[3]) == torchrun_pid and \
                    f"LOCAL_RANK={local_rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except OSError:
            continue
    return None


def test_under_torchrun_a_data_error_or_a_lost_rank_is_rank_0s_one_line(tmp_path):
    """A refusal while the data loads (rank 0 reads first) stops every rank with rank 0's line and no gloo
    traceback from the others; a rank killed mid-epoch leaves rank 0 saying where the run stands."""
    refused = torchrun(ROOT / "common.py", "--model", "resnet8", "--dataset", "synthetic", "--train-subset", 205,
                       "--out-dir", "run", cwd=tmp_path)
    out, err = refused.communicate(timeout=120)
    assert refused.returncode == 1 and out == ""
    assert [line for line in err.splitlines() if "error:" in line] == [
        "error: --train-subset 205 does not split evenly over the 10 classes of synthetic: use a multiple of 10, e.g. "
        "200 or 210"]
    assert not [line for line in err.splitlines() if line.startswith("[rank") and "Error" in line], err
    command = [ROOT / "common.py", "--model", "resnet8", *TINY, "--epochs", 50, "--out-dir", "run", "--device", "cpu"]
    run = torchrun(*command, cwd=tmp_path)
    while not (tmp_path / "run" / "checkpoint.pt").exists() and run.poll() is None:
        time.sleep(0.05)
    os.kill(rank_pid(run.pid, 1), signal.SIGKILL)
    out, err = run.communicate(timeout=120)
    assert run.returncode != 0
    last = out.strip().splitlines()[-1]
    assert last.startswith(("error: another process of this torchrun job stopped", "interrupted (SIGTERM)")), out
    assert "the last complete checkpoint is run/checkpoint.pt" in last and last.endswith("--out-dir run --device cpu "
                                                                                          "--resume")
    assert not [line for line in err.splitlines() if line.startswith("[rank0]") and "Traceback" in line], err

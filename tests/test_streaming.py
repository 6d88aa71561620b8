"""The streamed image-folder pipeline (--dataset imagenet, --pipeline stream) on a generated folder of JPEGs
of several sizes and aspect ratios in ImageNet's layout: batches that depend only on (seed, epoch) and the
rank, not on the number of worker processes; rank shards that are disjoint and cover the epoch; the
evaluation images equal to torchvision's Resize(256) + CenterCrop(224); crop boxes within each image; bad
files named before training; each method on an ImageNet pair; an exact resume after a kill mid-epoch."""
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import blockwise_kd
import common
import lfcc
import sskd
from conftest import make_args, make_imagenet_folder, refused, run
from models import create_model

CLASSES = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    """24 training and 9 validation JPEGs of 3 classes (conftest.make_imagenet_folder)."""
    return make_imagenet_folder(tmp_path_factory.mktemp("imagenet"), 8, 3, CLASSES)


def streamed(folder, *flags):
    args = make_args("--dataset", "imagenet", "--data-dir", folder, "--image-size", 64, *flags)
    return common.load_data(args, torch.device("cpu"))


def test_batches_depend_on_seed_and_epoch_not_on_the_workers(imagenet_folder):
    alone, pool = streamed(imagenet_folder, "--workers", 0), streamed(imagenet_folder, "--workers", 2)
    assert isinstance(alone, common.StreamedData) and len(alone.train_y) == 24 and alone.num_classes == 3
    first = list(common.train_batches(alone, 10, seed=0, epoch=3))
    assert [len(y) for _, y in first] == [10, 10, 4] and first[0][0].shape == (10, 3, 64, 64)
    for (x, y), (x2, y2) in zip(first, common.train_batches(pool, 10, seed=0, epoch=3)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = next(common.train_batches(alone, 10, seed=0, epoch=4))[0]
    assert not torch.equal(other, first[0][0])
    # Every sample its own crop: the first batch's samples all differ.
    assert len({tuple(x.flatten().tolist()) for x in first[0][0]}) == 10


def test_rank_shards_are_disjoint_and_cover_each_global_batch(imagenet_folder):
    data = streamed(imagenet_folder, "--workers", 0)
    whole = data.train_plan(10, seed=1, epoch=0, shard=(0, 1))
    parts = [data.train_plan(10, seed=1, epoch=0, shard=(r, 3)) for r in range(3)]
    for b, batch in enumerate(whole):
        assert sum((part[b] for part in parts), []) == batch  # the ranks' parts, in order, are the batch
    indices = [row[0] for batch in whole for row in batch]
    assert sorted(indices) == list(range(24))  # an epoch is every image once
    # Each crop box lies within its own image.
    for index, top, left, h, w, _ in (row for batch in whole for row in batch):
        height, width = data.train_sizes[index].tolist()
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0


def test_evaluation_images_equal_torchvisions_resize_and_center_crop(imagenet_folder):
    data = streamed(imagenet_folder, "--image-size", 224, "--workers", 0)
    assert data.eval_resize == 256
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    x, y = next(common.test_batches(data, batch_size=9))
    for image, label, path in zip(x, y, data.test_paths):
        with Image.open(path) as img:
            expected = data.normalize(reference(img.convert("RGB"))[None])[0]
        assert torch.equal(image, expected) and CLASSES[label] == path.parent.name


def test_resized_crop_boxes_take_each_images_own_size():
    heights, widths = torch.tensor([40, 300, 100]).repeat(2000), torch.tensor([300, 40, 100]).repeat(2000)
    boxes = common.resized_crop_boxes(6000, heights, widths, (0.08, 1.0), (3 / 4, 4 / 3),
                                      torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= heights).all() and (left + w <= widths).all()
    single = common.resized_crop_boxes(2000, 100, 100, (0.08, 1.0), (3 / 4, 4 / 3),
                                       torch.Generator().manual_seed(0))
    square = boxes[2::3]
    assert abs(square[:, 2:].float().mean() - single[:, 2:].float().mean()) < 2  # the same law


def test_bad_files_and_layouts_are_named_before_training(imagenet_folder, tmp_path, monkeypatch, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(imagenet_folder, broken)
    (broken / "train" / CLASSES[0] / "notes.JPEG").write_text("not a picture")
    flags = ["--model", "resnet8", "--dataset", "imagenet", "--data-dir", broken, "--image-size", 64,
             "--workers", 0, "--epochs", 1]
    message = refused(monkeypatch, capsys, common.main, *flags)
    assert message.startswith(f"error: cannot read {broken}/train/{CLASSES[0]}/notes.JPEG (not an image format")
    (broken / "train" / CLASSES[0] / "notes.JPEG").unlink()
    shutil.rmtree(broken / "val" / CLASSES[2])
    message = refused(monkeypatch, capsys, common.main, *flags)
    assert f"only in train/: {CLASSES[2]}; only in val/: none" in message


def test_a_file_that_fails_to_decode_in_training_is_named(imagenet_folder, tmp_path):
    import shutil
    truncated = tmp_path / "truncated"
    shutil.copytree(imagenet_folder, truncated)
    victim = truncated / "train" / CLASSES[1] / f"{CLASSES[1]}_0.JPEG"
    victim.write_bytes(victim.read_bytes()[:-300])  # the header is intact, the last pixels are not
    data = streamed(truncated, "--workers", 0)
    with pytest.raises(SystemExit, match=f"error: cannot read {victim} \\(cannot be decoded"):
        list(common.train_batches(data, 8, seed=0, epoch=0))


def test_a_streamed_run_killed_mid_epoch_resumes_exactly(imagenet_folder, tmp_path):
    def setup(out, *extra):
        args = make_args("--dataset", "imagenet", "--data-dir", imagenet_folder, "--image-size", 64, "--epochs", 2,
                         "--batch-size", 8, "--out-dir", out, *extra)
        torch.manual_seed(0)
        return args, create_model("resnet8", 3), common.load_data(args, torch.device("cpu"))

    args, model, data = setup(tmp_path / "full", "--workers", 0)
    common.fit(model, data, tmp_path / "full", common.make_recipe(args, "cnn"), **common.run_options(args))
    args, killed, data = setup(tmp_path / "killed", "--workers", 2)

    def dies_in_epoch_2(x, y, progress):
        if progress >= 1.3:
            raise KeyboardInterrupt
        return F.cross_entropy(killed(x), y), {}
    with pytest.raises(KeyboardInterrupt):
        common.fit(killed, data, tmp_path / "killed", common.make_recipe(args, "cnn"), loss_fn=dies_in_epoch_2,
                   **common.run_options(args))
    args, resumed, data = setup(tmp_path / "killed", "--workers", 1, "--resume")
    common.fit(resumed, data, tmp_path / "killed", common.make_recipe(args, "cnn"), **common.run_options(args))
    a = torch.load(tmp_path / "full" / "model.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "model.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_method_runs_an_imagenet_pair_on_the_streamed_folder(imagenet_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = ["--dataset", "imagenet", "--data-dir", imagenet_folder, "--image-size", 64, "--batch-size", 12,
            "--workers", 0, "--epochs", 1, "--teacher-epochs", 1]
    pair = ["--teacher", "tv_resnet18", "--student", "tv_resnet18"]
    for name, module in (("blockkd", blockwise_kd), ("sskd", sskd), ("lfcc", lfcc)):
        run(monkeypatch, module.main, *pair, *data, "--out-dir", name)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["teacher"]["epochs"] == 1
        fingerprint = json.loads((tmp_path / name / "run.json").read_text())["config"]["data"]
        assert torch.load(tmp_path / name / "model.pth", weights_only=True)["data"] == fingerprint


def test_sigterm_to_the_process_group_with_decoding_workers_is_one_line(imagenet_folder, tmp_path):
    """A scheduler's SIGTERM reaches every process of the job, the decoding workers too: the training
    process alone answers, with its one line, and no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    command = [sys.executable, str(ROOT / "common.py"), "--model", "resnet8", "--dataset", "imagenet", "--data-dir",
               str(imagenet_folder), "--image-size", "64", "--batch-size", "8", "--workers", "2", "--epochs",
               "500", "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # its own process group, as a scheduler's job step
    while not (tmp_path / "run" / "checkpoint.pt").exists() and job.poll() is None:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    assert out.strip().splitlines()[-1].startswith("interrupted (SIGTERM): the last complete checkpoint is")
    assert "Traceback" not in err and "Error" not in err, err

"""The streamed pipeline (plumbing/streaming.py): batches independent of the workers, one decoding, failing files.

The streamed image-folder pipeline (--dataset imagenet, --pipeline stream) on a generated folder of JPEGs of
several sizes and aspect ratios in ImageNet's layout: batches that depend only on (seed, epoch) and the rank,
not on the number of worker processes; rank shards that are disjoint and cover the epoch; the evaluation
images equal to torchvision's Resize(256) + CenterCrop(224); crop boxes within each image; bad files named
before training; each method on an ImageNet pair; an exact resume after a kill mid-epoch."""
import json

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import blockwise_kd
import common
import lfcc
import sskd
from plumbing import streaming
from conftest import IMAGENET_CLASSES, make_args, make_imagenet_folder, refused, run

CLASSES = IMAGENET_CLASSES


def streamed(folder, *flags):
    args = make_args("--dataset", "imagenet", "--data-dir", folder, "--image-size", 64, *flags)
    return common.load_data(args, torch.device("cpu"))


def test_batches_depend_on_seed_and_epoch_not_on_the_workers(imagenet_folder):
    alone, pool = streamed(imagenet_folder, "--workers", 0), streamed(imagenet_folder, "--workers", 2)
    assert isinstance(alone, streaming.StreamedData) and len(alone.train_y) == 24 and alone.num_classes == 3
    first = list(alone.train_batches(10, seed=0, epoch=3))
    assert [len(y) for _, y in first] == [10, 10, 4] and first[0][0].shape == (10, 3, 64, 64)
    for (x, y), (x2, y2) in zip(first, pool.train_batches(10, seed=0, epoch=3)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = next(alone.train_batches(10, seed=0, epoch=4))[0]
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
    x, y = next(data.test_batches(batch_size=9))
    for image, label, path in zip(x, y, data.test_paths):
        with Image.open(path) as img:
            expected = data.normalize(reference(img.convert("RGB"))[None])[0]
        assert torch.equal(image, expected) and CLASSES[label] == path.parent.name


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
    with pytest.raises(streaming.UnreadableFile, match=f"{victim} \\(cannot be decoded"):
        list(data.train_batches(8, seed=0, epoch=0))


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


# ------------------------------------------------- files that fail, and odd formats, in either pipeline

def test_16_bit_greyscale_and_animated_gifs_decode_alike_for_training_and_evaluation(tmp_path):
    """One decoding (decode_rgb) for the streamed training crops and evaluation images, and the device
    pipeline's reading: 16-bit greyscale scaled to 8 bits (30000 -> 117, not clipped to white), an animated
    GIF's first frame."""
    Image.fromarray(np.full((40, 50), 30000, dtype=np.uint16)).save(tmp_path / "grey16.png")
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8)) for i in range(3)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    grey = streaming.decode_rgb(tmp_path / "grey16.png")
    assert grey.dtype == torch.uint8 and (grey == 117).all()
    assert (streaming.decode_center(tmp_path / "grey16.png", 16, 18) == 117).all()
    assert (streaming.decode_crop(tmp_path / "grey16.png", (0, 0, 40, 50), 16, False) == 117).all()
    first_frame = torch.tensor(streaming.read_image(tmp_path / "animated.gif", size=None)).permute(2, 0, 1)
    assert torch.equal(streaming.decode_rgb(tmp_path / "animated.gif"), first_frame)
    with Image.open(tmp_path / "animated.gif") as gif:  # frame 0 (GIF's palette: not the frame saved)
        assert gif.n_frames == 3 and torch.equal(first_frame, torch.tensor(np.asarray(gif.convert("RGB"))).permute(2, 0, 1))
    assert streaming.decode_crop(tmp_path / "animated.gif", (5, 5, 20, 30), 16, True).shape == (3, 16, 16)


@pytest.mark.parametrize("pipeline", ["stream, 2 workers", "stream, no worker", "device"])
def test_a_link_to_nothing_is_one_line_in_every_pipeline_and_nothing_hangs(pipeline, imagenet_folder, tmp_path):
    """A dangling symbolic link (or a file deleted after the listing) once hung a streamed run forever: its
    header worker raised, and the main process waited for workers that ignore SIGTERM."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT
    folder = tmp_path / "images"
    shutil.copytree(imagenet_folder, folder)
    (folder / "train" / CLASSES[0] / "gone.JPEG").symlink_to(tmp_path / "nowhere.JPEG")
    flags = {"stream, 2 workers": ["--dataset", "imagenet", "--workers", "2"],
             "stream, no worker": ["--dataset", "imagenet", "--workers", "0"],
             "device": ["--dataset", "folder", "--pipeline", "device"]}[pipeline]
    if pipeline == "device":
        (folder / "val").rename(folder / "test")
    command = [sys.executable, str(ROOT / "common.py"), "--model", "resnet8", "--data-dir", str(folder),
               "--image-size", "32", "--epochs", "1", "--out-dir", str(tmp_path / "run"), *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: cannot read {folder / 'train' / CLASSES[0] / 'gone.JPEG'} (no such file: "
                           "deleted, or a link to nothing)")


def test_a_corrupt_validation_image_costs_no_training_and_the_advice_goes_on(imagenet_folder, tmp_path, monkeypatch,
                                                                             capsys):
    """A truncated test image (its header intact) fails at the first evaluation: the epoch's training was
    checkpointed first; the stop line names the file, that checkpoint and the command that goes on once the
    file is deleted, which continues the run (evaluating that epoch first) and records the data change."""
    import shutil
    folder = tmp_path / "images"
    shutil.copytree(imagenet_folder, folder)
    victim = folder / "val" / CLASSES[2] / f"{CLASSES[2]}_1.JPEG"
    victim.write_bytes(victim.read_bytes()[:-300])
    monkeypatch.chdir(tmp_path)
    flags = ["--model", "resnet8", "--dataset", "imagenet", "--data-dir", folder, "--image-size", 32, "--workers", 0,
             "--epochs", 2, "--batch-size", 8]
    with pytest.raises(SystemExit) as stop:
        run(monkeypatch, common.main, *flags)
    assert stop.value.code == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    [out_dir] = (tmp_path / "runs").iterdir()
    checkpoint = out_dir.relative_to(tmp_path) / "checkpoint.pt"
    assert line.startswith(f"error: cannot read {victim} (cannot be decoded") and "a run does not skip images" in line
    assert f"The last complete checkpoint is {checkpoint} (epoch 1/2); replace the file or delete it, then go on " \
           "with: python script.py " in line
    assert torch.load(out_dir / "checkpoint.pt", weights_only=True)["history"][0]["evaluated"] is False
    victim.unlink()  # the advice
    command = line.split("go on with: python script.py ")[1].split()
    assert command[-4:] == ["--out-dir", str(out_dir.relative_to(tmp_path)), "--resume", "--allow-data-change"]
    run(monkeypatch, common.main, *command)  # as written
    out = capsys.readouterr().out
    assert "--allow-data-change: the data changed since the run started" in out and "24 -> 24 training, 9 -> 8 test" in out
    rows = [json.loads(row) for row in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and all("test_acc" in row and "evaluated" not in row for row in rows)
    record = json.loads((out_dir / "run.json").read_text())
    assert [(c["test_images before"], c["test_images"]) for c in record["data_changes"]] == [(9, 8)]
    assert record["config"]["data"] == torch.load(out_dir / "model.pth", weights_only=True)["data"]
    run(monkeypatch, common.main, *command[:-1])  # later resumes need no flag: the change is the run's
    assert "(finished: no epoch left to train)" in capsys.readouterr().out


def test_other_data_is_not_a_data_change(imagenet_folder, tmp_path, monkeypatch, capsys):
    """--allow-data-change takes deleted or replaced files, not another dataset (other classes, or more than 1 %
    of a split's images gone)."""
    monkeypatch.chdir(tmp_path)
    flags = ["--model", "resnet8", "--dataset", "imagenet", "--image-size", 32, "--workers", 0, "--epochs", 1,
             "--batch-size", 8, "--out-dir", "run"]
    run(monkeypatch, common.main, *flags, "--data-dir", imagenet_folder)
    fewer = make_imagenet_folder(tmp_path / "fewer", 6, 3, CLASSES)
    message = refused(monkeypatch, capsys, common.main, *flags, "--data-dir", fewer, "--resume")
    assert "the data (content fingerprint)" in message and "add --allow-data-change" in message
    message = refused(monkeypatch, capsys, common.main, *flags, "--data-dir", fewer, "--resume", "--allow-data-change")
    assert message.startswith("error: --allow-data-change accepts deleted or replaced files, not other data: train "
                              "images 24 -> 18, test images 9 -> 9") or "train images 24 -> 18" in message


def test_an_evaluation_resize_below_the_image_size_is_refused(imagenet_folder, monkeypatch, capsys):
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", "--dataset", "imagenet", "--data-dir",
                      imagenet_folder, "--image-size", 32, "--eval-resize", 8)
    assert message == ("error: --eval-resize 8 is smaller than --image-size 32: the center crop would be mostly "
                       "padding; use at least 32 (default: 37, torchvision's 256/224)")

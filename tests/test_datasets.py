"""Where the images come from (plumbing/datasets.py): CIFAR's files, image folders read whole, the subset."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
from plumbing import datasets
from conftest import ROOT, SCRIPTS, make_args, one_line_exit


def image_folder(root, files):
    """Write {relative path: PIL image or text} under root; returns root."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            content.save(path)  # the format from the extension (.jfif and .jpe are JPEG)
    return root


def rgb(value):
    return Image.new("RGB", (32, 32), (value, value, value))


def test_folder_of_odd_sizes_and_modes(tmp_path):
    for split in ("train", "test"):
        for cls in ("cat", "ant"):
            (tmp_path / split / cls).mkdir(parents=True)
        Image.new("L", (40, 20), 200).save(tmp_path / split / "ant" / "a.png")
        Image.new("RGBA", (32, 32), (10, 20, 30, 128)).save(tmp_path / split / "ant" / "b.png")
        Image.new("RGB", (64, 48), (250, 0, 0)).save(tmp_path / split / "cat" / "c.jpg")
        Image.new("P", (31, 33)).save(tmp_path / split / "cat" / "d.bmp")
        (tmp_path / split / "cat" / "notes.txt").write_text("not an image")
    data = common.load_data(make_args("--dataset", "folder", "--data-dir", tmp_path), torch.device("cpu"))
    assert data.train_x.shape == (4, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.num_classes == 2 and data.train_y.tolist() == [0, 0, 1, 1]  # classes sorted: ant, cat
    assert data.train_x[0].float().mean().item() == 200  # grayscale becomes equal RGB channels
    assert data.train_x[2, 0].float().mean() > 200 and data.train_x[2, 1].float().mean() < 50


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    Image.fromarray(np.full((32, 32), 30146, dtype=np.uint16)).save(tmp_path / "grey.png")  # 46 % grey
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")
    pixels = datasets.read_image(tmp_path / "ramp.png")
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    assert np.abs(pixels[..., 0].astype(float) - ramp / 257).max() <= 0.5  # was 0, 64, 128, 192, 255, 255, ...
    assert (datasets.read_image(tmp_path / "grey.png") == 117).all()  # was 255: white


def test_images_with_no_8_bit_reading_are_refused_by_name(tmp_path):
    folder = image_folder(tmp_path, {"train/a/x.png": rgb(0), "test/a/y.png": rgb(0)})
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(folder / "train" / "a" / "float.tif")
    with pytest.raises(SystemExit) as stop:
        common.load_image_folder(folder)
    assert str(folder / "train" / "a" / "float.tif") in str(stop.value) and "32-bit float" in str(stop.value)


def test_every_file_under_a_class_folder_is_read_or_counted(tmp_path, capsys):
    folder = image_folder(tmp_path, {
        "train/cat/a.png": rgb(10), "train/cat/b.JFIF": rgb(20), "train/cat/c.jpe": rgb(30),
        "train/cat/sub/deeper/d.png": rgb(40), "train/cat/notes.txt": "not an image",
        "train/dog/e.png": rgb(50), "test/cat/f.png": rgb(60), "test/dog/g.png": rgb(70),
        "train/.ipynb_checkpoints/h.png": rgb(80), "test/.ipynb_checkpoints/i.png": rgb(90),
        "train/dog/.DS_Store": "finder", "train/README.md": "about"})
    (train_x, train_y, test_x, test_y), num_classes = common.load_image_folder(folder)
    assert num_classes == 2  # .ipynb_checkpoints is no class
    assert train_y.tolist() == [0, 0, 0, 0, 1] and test_y.tolist() == [0, 1]  # sub-folders, .jfif and .jpe read
    assert train_x[:, 0, 0, 0].tolist() == pytest.approx([10, 20, 30, 40, 50], abs=2)  # in sorted order, depth last
    line = capsys.readouterr().out.strip()
    assert "not read: 3 hidden entries, names starting with '.', ignored (e.g. train/.ipynb_checkpoints)" in line
    assert "2 files that are not images by their extension (e.g. train/README.md)" in line


def test_a_folder_is_listed_once_whichever_pipeline_reads_it(tmp_path, capsys):
    """--pipeline auto lists the folder to choose the pipeline; the chosen one reads that listing."""
    folder = image_folder(tmp_path, {"train/cat/a.png": rgb(10), "train/dog/b.png": rgb(20),
                                     "test/cat/c.png": rgb(30), "test/dog/d.png": rgb(40),
                                     "train/dog/.DS_Store": "finder"})
    for pipeline in ("auto", "device", "stream"):
        args = make_args("--dataset", "folder", "--data-dir", folder, "--pipeline", pipeline, "--workers", 0)
        common.load_data(args, torch.device("cpu"))
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1 and "not read: 1 hidden entries" in lines[0], (pipeline, lines)


@pytest.mark.parametrize("missing", ["test/dog", "train/dog"])
def test_a_class_without_training_or_test_images_is_named(missing, tmp_path):
    files = {"train/cat/a.png": rgb(0), "train/dog/b.png": rgb(0), "test/cat/c.png": rgb(0), "test/dog/d.png": rgb(0)}
    files = {k: v for k, v in files.items() if not k.startswith(missing)}
    folder = image_folder(tmp_path, files)
    (folder / missing).mkdir(parents=True, exist_ok=True)
    (folder / missing / "notes.txt").write_text("no images here")
    with pytest.raises(SystemExit) as stop:
        common.load_image_folder(folder)
    assert str(stop.value).startswith(f"error: {folder}/: no images in {missing}/; every class needs training and test")


def two_class_folder(root, train_classes=("ant", "cat"), test_classes=("ant", "cat")):
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32), (200, 10, 10)).save(root / split / cls / "a.png")
            Image.new("RGB", (32, 32), (10, 200, 10)).save(root / split / cls / "b.jpg")
    return root


def truncated_jpeg(path):
    Image.effect_noise((32, 32), 64).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def load_folder(root):
    return common.load_data(make_args("--dataset", "folder", "--data-dir", root), torch.device("cpu"))


@pytest.mark.parametrize("kind, reason", [
    ("truncated", "(cannot be decoded: "), ("text", "(not an image format Pillow can read)"), ("empty", "(empty file)"),
])
def test_unreadable_image_is_named_with_the_reason(kind, reason, tmp_path):
    root = two_class_folder(tmp_path)
    bad = root / "train" / "cat" / "x.jpg"
    {"truncated": truncated_jpeg, "text": lambda p: p.write_text("not an image"),
     "empty": lambda p: p.write_bytes(b"")}[kind](bad)
    with pytest.raises(SystemExit) as error:
        load_folder(root)
    assert one_line_exit(error).startswith(f"error: cannot read {bad} {reason}")
    assert "1 of the 9 image files" in str(error.value)


def test_unreadable_images_are_counted_and_the_first_named(tmp_path):
    root = two_class_folder(tmp_path)
    truncated_jpeg(root / "train" / "ant" / "c.jpg")
    (root / "train" / "cat" / "x.jpg").write_text("not an image")
    (root / "test" / "ant" / "y.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as error:
        load_folder(root)
    message = one_line_exit(error)
    assert message.startswith(f"error: cannot read {root / 'train' / 'ant' / 'c.jpg'} (cannot be decoded: ")
    assert f"3 of the 11 image files under {root}/ cannot be read in all" in message


@pytest.mark.parametrize("train_classes, test_classes, wanted", [
    (("ant", "cat", "dog"), ("ant", "cat"), "only in train/: dog; only in test/: none"),
    (("ant", "cat"), ("ant", "cat", "eel"), "only in train/: none; only in test/: eel"),
    (("ant", "cat", "dog"), ("ant", "eel", "fox"), "only in train/: cat, dog; only in test/: eel, fox"),
])
def test_class_lists_of_train_and_test_must_match(train_classes, test_classes, wanted, tmp_path):
    with pytest.raises(SystemExit) as error:
        load_folder(two_class_folder(tmp_path, train_classes, test_classes))
    assert one_line_exit(error) == f"error: {tmp_path}/train/ and {tmp_path}/test/ have different classes: {wanted}"


def test_missing_folder_names_directory_and_fix(tmp_path):
    with pytest.raises(SystemExit) as error:
        common.load_data(make_args("--dataset", "folder", "--data-dir", tmp_path / "nowhere"), torch.device("cpu"))
    assert "nowhere/train/<class>/" in str(error.value) and "shared" not in str(error.value)


def test_missing_cifar_without_network_says_what_to_do(monkeypatch, tmp_path):
    def offline(root, train, download):
        raise RuntimeError("Dataset not found") if not download else OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(SystemExit) as error:
        common.load_data(make_args("--data-dir", tmp_path), torch.device("cpu"))
    message = str(error.value)
    assert str(tmp_path) in message and "download=True" in message


def test_cifar_files_that_fail_the_md5_check_are_named(tmp_path):
    """A damaged or partial download is not 'missing': the line says which file is wrong and what to do."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not the real file")
    with pytest.raises(SystemExit) as error:
        common.load_data(make_args("--data-dir", tmp_path), torch.device("cpu"))
    assert str(error.value) == (f"error: {folder}/ is incomplete or damaged (damaged (fail torchvision's md5 check): "
                                f"train, test, meta): a partial or broken download. Delete {folder}/ and download "
                                "it again, or pass --data-dir DIR where a good copy is")
    (folder / "test").unlink()
    with pytest.raises(SystemExit, match=r"\(damaged \(fail torchvision's md5 check\): train, meta; missing: test\)"):
        common.load_data(make_args("--data-dir", tmp_path), torch.device("cpu"))


def test_subset_is_class_balanced_and_fixed():
    labels = torch.arange(1000) % 10
    a = common.balanced_subset(labels, 200, 10, seed=0)
    assert len(a) == 200 and torch.bincount(labels[a]).tolist() == [20] * 10
    assert torch.equal(a, common.balanced_subset(labels, 200, 10, seed=0))
    with pytest.raises(SystemExit):
        common.balanced_subset(labels, 2000, 10, seed=0)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag, subset, wanted", [
    ("--train-subset", 5, "error: --train-subset 5 is fewer than the 10 classes of synthetic"),
    ("--train-subset", 101, "error: --train-subset 101 is more than the 100 training images of synthetic"),
    ("--train-subset", 29, "error: --train-subset 29 does not split evenly over the 10 classes of synthetic: use a "
                           "multiple of 10, e.g. 20 or 30"),  # it trained on 20 and recorded 29
    ("--test-subset", 30, "error: --test-subset 30 is more than the 20 test images of synthetic"),
    ("--test-subset", 15, "error: --test-subset 15 does not split evenly over the 10 classes of synthetic: use a "
                          "multiple of 10, e.g. 10 or 20"),
])
def test_a_subset_outside_the_data_stops_before_any_model(script, flag, subset, wanted, monkeypatch):
    small = common.make_synthetic(train_size=100, test_size=20)
    monkeypatch.setattr(common, "make_synthetic", lambda **size: small)
    for name in ("build_model", "load_teacher"):
        monkeypatch.setattr(common, name, lambda *a: pytest.fail("a model was built"))
    module, base = SCRIPTS[script]
    with pytest.raises(SystemExit) as error:
        module.main(base + ["--dataset", "synthetic", "--device", "cpu", flag, str(subset)])
    assert one_line_exit(error).startswith(wanted)


@pytest.mark.parametrize("pipeline", ["device", "stream"])
def test_test_subset_evaluates_on_a_fixed_balanced_part_and_keeps_the_datas_fingerprint(pipeline, imagenet_folder):
    """--test-subset N: N test images, N / classes of each, the same on every load, the training images
    untouched; the fingerprint stays the whole data's, so a teacher trained by such a run is this data's."""
    def load(*extra):
        return common.load_data(make_args("--dataset", "imagenet", "--data-dir", imagenet_folder, "--image-size", 32,
                                          "--pipeline", pipeline, "--workers", 0, *extra), torch.device("cpu"))
    whole, part, again = load(), load("--test-subset", 6), load("--test-subset", 6)
    assert len(whole.test_y) == 9 and torch.bincount(part.test_y).tolist() == [2, 2, 2]
    assert torch.equal(part.test_y, again.test_y) and torch.equal(part.train_y, whole.train_y)
    assert part.fingerprint == whole.fingerprint
    keep = common.balanced_subset(whole.test_y, 6, 3, seed=0)
    (x_whole, _), (x_part, y_part) = next(whole.test_batches(9)), next(part.test_batches(6))
    assert torch.equal(y_part, whole.test_y[keep]) and torch.equal(x_part, x_whole[keep])  # the same images


def test_train_subset_error_is_one_line_from_the_command_line():
    """The one place a subprocess shows more: exit code 1 and nothing but the error line on stderr."""
    done = subprocess.run([sys.executable, "common.py", "--model", "resnet8", "--dataset", "synthetic",
                           "--device", "cpu", "--train-subset", "5"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: --train-subset 5 is fewer than the 10 classes") and \
        done.stderr.count("\n") == 1, done.stderr

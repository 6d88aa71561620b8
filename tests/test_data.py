import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
from plumbing import datasets
from conftest import make_args


def constant_data(images, labels):
    return common.Data(images, labels, images, labels, 2, (0, 0, 0), (1, 1, 1), "test")


def test_batches_shapes_and_seeded_determinism(synthetic_data):
    batches = list(synthetic_data.train_batches(64, seed=0, epoch=3))
    assert len(batches) == 10 and batches[0][0].shape == (64, 3, 32, 32) and batches[0][0].dtype == torch.float32
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(synthetic_data.train_y.tolist())
    again = list(synthetic_data.train_batches(64, seed=0, epoch=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = next(synthetic_data.train_batches(64, seed=0, epoch=4))
    assert not torch.equal(other[0], batches[0][0])


def test_crop_pads_with_zeros_at_the_expected_rate():
    n = 4000
    data = constant_data(torch.full((n, 3, 32, 32), 255, dtype=torch.uint8), torch.zeros(n, dtype=torch.long))
    x = torch.cat([b for b, _ in data.train_batches(500, seed=1, epoch=0)])
    # Offsets are uniform in 0..8 per axis, so on average 20/9 rows and 20/9 columns are padding.
    expected = ((32 - 20 / 9) / 32) ** 2
    assert abs((x > 0).float().mean().item() - expected) < 0.005
    assert x.max().item() == 1.0 and x.min().item() == 0.0


def test_flip_happens_half_the_time():
    n = 4000
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[..., :16] = 255  # bright left half
    data = constant_data(images, torch.zeros(n, dtype=torch.long))
    x = torch.cat([b for b, _ in data.train_batches(500, seed=2, epoch=0)])
    left, right = x[..., :8].sum((1, 2, 3)), x[..., 24:].sum((1, 2, 3))
    assert torch.all((left == 0) ^ (right == 0))  # a shift of at most 4 pixels never mixes the halves
    assert abs((right > 0).float().mean().item() - 0.5) < 0.03


def test_normalization_uses_mean_and_std(synthetic_data):
    x = synthetic_data.normalize(synthetic_data.train_x)
    assert x.mean((0, 2, 3)).abs().max() < 1e-3 and (x.std((0, 2, 3)) - 1).abs().max() < 1e-3


def test_subset_is_class_balanced_and_fixed():
    labels = torch.arange(1000) % 10
    a = common.balanced_subset(labels, 200, 10, seed=0)
    assert len(a) == 200 and torch.bincount(labels[a]).tolist() == [20] * 10
    assert torch.equal(a, common.balanced_subset(labels, 200, 10, seed=0))
    with pytest.raises(SystemExit):
        common.balanced_subset(labels, 2000, 10, seed=0)


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


# ------------------------------------------- image folders: every file read or counted, none distorted

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


@pytest.mark.parametrize("flags, wanted", [
    (["--dataset", "synthetic", "--pipeline", "stream"], "--pipeline stream reads an image folder's files"),
    (["--dataset", "synthetic", "--eval-resize", 40], "--eval-resize has no effect in the device pipeline"),
    (["--dataset", "imagenet", "--augment", "pad-crop"], "--augment pad-crop has no effect in the streamed pipeline"),
    (["--dataset", "imagenet", "--store-size", 16], "--store-size has no effect in the streamed pipeline")])
def test_a_flag_that_the_pipeline_would_ignore_is_refused(flags, wanted, tmp_path):
    """Recorded as training flags, they would name runs and block resumes while changing nothing."""
    from conftest import make_imagenet_folder
    folder = make_imagenet_folder(tmp_path / "imagenet", 2, 1)
    with pytest.raises(SystemExit) as stop:
        common.load_data(make_args("--data-dir", folder, "--image-size", 32, "--workers", 0, *flags),
                         torch.device("cpu"))
    assert str(stop.value).startswith(f"error: {wanted}")

"""Data on the device (common.Data, load_data): batches seeded by (seed, epoch), padding crops, flips, upsampling."""
import pytest
import torch
import torch.nn.functional as F

import common
from conftest import TINY, make_args, refused, run


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


# ------------------------------------------- image folders: every file read or counted, none distorted


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


def upsampled_data(image_size=64, same_image=False):
    data = common.load_data(make_args(*TINY, "--image-size", image_size, "--store-size", 32), torch.device("cpu"))
    if same_image:  # every sample one image: what differs in a batch is its own crop and flip
        data.train_x = data.train_x[:1].expand_as(data.train_x).contiguous()
    return data


def test_every_sample_gets_its_own_crop_deterministic_in_seed_and_epoch():
    data = upsampled_data(same_image=True)
    assert (data.stored_size, data.image_size, data.augment) == (32, 64, "resized-crop")
    x, y = next(data.train_batches(50, seed=0, epoch=0))
    assert x.shape == (50, 3, 64, 64)
    assert len({tuple(sample.flatten().tolist()) for sample in x}) == 50  # 50 crops, not one per batch
    again = list(data.train_batches(50, seed=0, epoch=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, data.train_batches(50, seed=0, epoch=0)))
    other = next(data.train_batches(50, seed=0, epoch=1))[0]
    assert not torch.equal(other, again[0][0])
    # Under torchrun each rank takes its part of each global batch: together, the single-process batch.
    parts = [next(data.train_batches(50, seed=0, epoch=0, shard=(r, 3)))[0] for r in range(3)]
    assert torch.equal(torch.cat(parts), again[0][0])


def test_test_images_are_resized_whole():
    data = upsampled_data()
    x, y = next(data.test_batches(batch_size=10))
    expected = data.normalize(F.interpolate(data.test_x[:10].float(), size=64, mode="bilinear"))
    torch.testing.assert_close(x, expected)


def test_bad_size_and_crop_flags_are_refused(monkeypatch, capsys):
    script = common.main
    cases = {("--image-size", 32, "--store-size", 64): "--store-size 64 is larger than the image size 32",
             ("--image-size", 64, "--store-size", 32, "--augment", "pad-crop"):
                 "--augment pad-crop crops at the size the images are kept at (32), not at --image-size 64",
             ("--crop-scale", 0.5, 0.1): "--crop-scale 0.5 0.1: MIN is above MAX"}
    for flags, message in cases.items():
        assert message in refused(monkeypatch, capsys, script, "--model", "resnet8", *TINY, *flags)
    with pytest.raises(SystemExit) as stop:
        script(["--model", "resnet8", *map(str, TINY), "--crop-scale", "0", "1"])
    assert stop.value.code == 2 and "--crop-scale: must be a number in (0, 1], not '0'" in capsys.readouterr().err


def test_a_run_kept_at_32_and_trained_at_48(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--image-size", 48, "--store-size", 32,
        "--epochs", 1, "--out-dir", "run")
    assert "on the device, kept at 32px, resized-crop to 48px" in capsys.readouterr().out
    assert (tmp_path / "run" / "model.pth").exists()

"""Weight files and the teacher cache (plumbing/weights.py): one loader, torchvision's weights, a run's teacher."""
import argparse
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blockwise_kd as bkd
import common
import models
from models import create_model
from plumbing import files
from conftest import METHOD_RUN, TEACHER_FILE, TINY, make_args, one_line_exit, refused, run


def test_wrong_checkpoint_names_both(tmp_path):
    data = argparse.Namespace(fingerprint="0123456789abcdef")
    common.save_atomic(common.model_file(create_model("resnet8", 10), 1, 0.0, data), tmp_path / "r8.pth")
    with pytest.raises(SystemExit, match="resnet8 with 10 classes.*resnet20 with 10 classes"):
        common.load_weights(create_model("resnet20", 10), tmp_path / "r8.pth")
    with pytest.raises(SystemExit, match="resnet8 with 10 classes.*resnet8 with 100 classes"):
        common.load_weights(create_model("resnet8", 100), tmp_path / "r8.pth")
    # A bare benchmark-style file (no 'arch' entry) is identified by its keys and shapes.
    torch.save({"model": create_model("wrn_16_2", 100).state_dict(), "epoch": 240}, tmp_path / "public.pth")
    with pytest.raises(SystemExit, match="wrn_16_2 with 100 classes.*resnet8x4"):
        common.load_weights(create_model("resnet8x4", 100), tmp_path / "public.pth")
    with pytest.raises(SystemExit, match=f"checkpoint {tmp_path} is a directory, not a checkpoint file"):
        common.load_weights(create_model("resnet8", 10), tmp_path)  # it said "does not exist"
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable"):
        common.load_weights(create_model("resnet8", 10), tmp_path / "junk.pth")


@pytest.mark.parametrize("content", ["whole model", "cut in half", "text"])
def test_unreadable_checkpoint_never_suggests_unsafe_loading(content, tmp_path):
    path = tmp_path / "teacher.pth"
    if content == "text":
        path.write_text("not a checkpoint")
    else:
        torch.save(create_model("resnet8", 10), path)  # a pickled module: weights_only loading refuses it
        if content == "cut in half":
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(SystemExit) as error:
        common.load_weights(create_model("resnet8", 10), path)
    message = one_line_exit(error)
    assert message.startswith(f"error: {path} is not a readable PyTorch checkpoint (")
    assert "weights_only" not in message and "trust" not in message
    if content == "whole model":
        assert "(UnpicklingError)" in message


class NotTensors:
    """A pickled object that a weights-only load refuses to run."""


@pytest.mark.parametrize("content, wanted", [
    ("tv_resnet34", "holds tv_resnet34 with 1000 classes, but tv_resnet18 with 1000 classes was asked for"),
    ("10 classes", "holds tv_resnet18 with 10 classes, but tv_resnet18 with 1000 classes was asked for"),
    ("truncated", "is not a readable PyTorch checkpoint"),
    ("unsafe pickle", "is not a readable PyTorch checkpoint (UnpicklingError); it must hold tensors only"),
    ("a list", "holds no state_dict"),
    ("an extra key", "is not a state_dict of tv_resnet18 with 1000 classes: its keys differ, 1 unexpected (e.g. "
                     "extra.weight)"),
    ("a missing key", "its keys differ, 1 missing (e.g. fc.bias)"),
    ("no such file", "checkpoint missing.pth does not exist"),
])
def test_every_bad_pretrained_file_is_one_line(content, wanted, tmp_path, monkeypatch, capsys):
    """--pretrained FILE reads through the teachers' loader (read_weights): one line for each bad file, none
    of torch's advice to load it unsafely, and a missing path is not taken for a torchvision weights name."""
    monkeypatch.chdir(tmp_path)
    state = models.create_model("tv_resnet18", 1000).state_dict()
    saved = {"tv_resnet34": models.create_model("tv_resnet34", 1000).state_dict(),
             "10 classes": models.create_model("tv_resnet18", 10).state_dict(),
             "unsafe pickle": {"model": NotTensors()}, "a list": [state["fc.bias"]],
             "an extra key": {**state, "extra.weight": torch.zeros(1)},
             "a missing key": {k: v for k, v in state.items() if k != "fc.bias"}}.get(content, state)
    if content != "no such file":
        torch.save(saved, tmp_path / "weights.pth")
    if content == "truncated":
        (tmp_path / "weights.pth").write_bytes((tmp_path / "weights.pth").read_bytes()[:5000])
    name = "missing.pth" if content == "no such file" else "weights.pth"
    message = refused(monkeypatch, capsys, common.main, "--model", "tv_resnet18", "--pretrained", name,
                      "--dataset", "synthetic", "--image-size", 32, "--train-subset", 100)
    assert wanted in message and "weights_only" not in message, message


def test_pretrained_is_for_imagenet_models(monkeypatch, capsys):
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", "--pretrained", "--dataset", "synthetic")
    assert message.startswith("error: --pretrained starts an ImageNet model from its 1000-class weights, and resnet8 "
                              "is a CIFAR model")


def test_pretrained_takes_a_state_dict_file_with_the_models_keys(tmp_path, monkeypatch):
    """timm's weights (or any ImageNet checkpoint) in a file: loaded strictly, then a new head."""
    torch.manual_seed(4)
    imagenet = models.create_model("mdistiller_mobilenetv1", 1000).state_dict()
    torch.save(imagenet, tmp_path / "mobilenetv1_imagenet.pth")
    state, record = common.pretrained_weights("mdistiller_mobilenetv1", str(tmp_path / "mobilenetv1_imagenet.pth"))
    model = common.start_from_weights("mdistiller_mobilenetv1", state, 10, torch.device("cpu"))
    head = models.classifier(model)
    assert head.out_features == 10 and record["accuracy"] is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in imagenet.items() if v.shape[:1] != (1000,))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A TORCH_HOME of the test's own, with no network: a download raises URLError at once."""
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_missing_weights_without_a_network_are_one_line_naming_the_file_and_where(torch_home):
    with pytest.raises(SystemExit) as stop:
        common.torchvision_weights("tv_resnet18", "IMAGENET1K_V1")
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert stop.value.code == (f"error: cannot load torchvision's resnet18 IMAGENET1K_V1 weights (URLError); "
                               f"without a network, download {url} elsewhere and put it at "
                               f"{torch_home / 'resnet18-f37072fd.pth'}")
    with pytest.raises(SystemExit, match="torchvision has no IMAGENET9K weights for resnet18; it has"):
        common.torchvision_weights("tv_resnet18", "IMAGENET9K")
    with pytest.raises(SystemExit, match="timm_deit_tiny_patch16_224 has no torchvision weights"):
        common.torchvision_weights("timm_deit_tiny_patch16_224", "IMAGENET1K_V1")


def test_weights_in_torch_home_load_strictly_and_get_a_new_head(torch_home, synthetic_data):
    torch.manual_seed(3)
    imagenet = models.create_model("tv_resnet18", 1000).state_dict()
    torch_home.mkdir(parents=True)
    torch.save(imagenet, torch_home / "resnet18-f37072fd.pth")  # as torchvision's download would have left it
    state, record = common.torchvision_weights("tv_resnet18", "IMAGENET1K_V1")
    assert record["accuracy"] == 69.758 and record["file"] == str(torch_home / "resnet18-f37072fd.pth")
    model = common.start_from_weights("tv_resnet18", state, 10, torch.device("cpu"))
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in imagenet.items() if not k.startswith("fc."))
    assert ours["fc.weight"].shape == (10, 512)  # a new head for the data's classes


def test_torchvision_weights_teach_1000_wnid_classes_as_they_are_and_are_measured_first(torch_home, tmp_path, capsys):
    """As the teacher of ImageNet's 1000 classes the weights are used as they are, frozen; they are measured on
    the run's validation split first (recorded beside the published number, with a warning near chance), the
    class folders must be wnids (the weights' outputs are their sorted order), and --teacher-epochs, which has
    nothing to train, is said to be unused."""
    from PIL import Image

    for split in ("train", "val"):
        for c in range(1000):
            (tmp_path / "imagenet" / split / f"n{c:08d}").mkdir(parents=True)
            Image.new("RGB", (8, 8), (c % 256, c // 256, 0)).save(tmp_path / "imagenet" / split / f"n{c:08d}" / "0.JPEG")
    torch.manual_seed(3)
    imagenet = models.create_model("tv_resnet18", 1000).state_dict()
    torch_home.mkdir(parents=True)
    torch.save(imagenet, torch_home / "resnet18-f37072fd.pth")
    args = make_args("--teacher", "tv_resnet18", "--teacher-weights", "IMAGENET1K_V1", "--dataset", "imagenet",
                     "--data-dir", tmp_path / "imagenet", "--image-size", 32, "--workers", 0, "--teacher-epochs", 30,
                     method_args=bkd.add_args)
    data = common.load_data(args, torch.device("cpu"))
    assert data.num_classes == 1000 and data.classes[:2] == ["n00000000", "n00000001"]
    teacher = common.load_teacher(args, data)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in imagenet.items())
    record = common.teacher_record(teacher)
    assert record["published_accuracy"] == 69.758 and record["accuracy"] is None
    assert 0 <= record["test_acc"] <= record["test_top5"] <= 100
    out = capsys.readouterr().out
    assert "--teacher-epochs 30 is not used: there is nothing to fine-tune" in out
    assert f"teacher tv_resnet18 measured on this run's test split (1000 images): top-1 {record['test_acc']:.2f} %" in out
    assert "warning: the teacher's top-1 accuracy" in out and "near chance (0.1 %)" in out  # random weights
    data.classes = [f"class{c}" for c in range(1000)]
    with pytest.raises(SystemExit, match=r"but this data's 1000 classes are class0, class1, class2, \.\.\.: name the "
                                         "class folders by their wnids"):
        common.load_teacher(args, data)


def test_a_teacher_fine_tuned_from_torchvision_weights_is_that_of_common_py_and_cached_under_their_name(
        torch_home, tmp_path, monkeypatch):
    """--teacher-weights on data of other classes fine-tunes them (new head) for --teacher-epochs, exactly as
    `common.py --pretrained --save-as-teacher` does, and caches the result as <teacher>-<WEIGHTS>_<E>ep.pth,
    never taken for the teacher trained from scratch."""
    torch_home.mkdir(parents=True)
    torch.save(models.create_model("tv_resnet18", 1000).state_dict(), torch_home / "resnet18-f37072fd.pth")
    monkeypatch.chdir(tmp_path)
    data_flags = ["--dataset", "synthetic", "--train-subset", 100, "--image-size", 32]  # the teacher's batch
    run(monkeypatch, common.main, "--model", "tv_resnet18", "--pretrained", *data_flags, "--epochs", 1,
        "--out-dir", "alone", "--save-as-teacher")
    [saved] = Path("checkpoints").glob("*/tv_resnet18-IMAGENET1K_V1_1ep.pth")
    args = make_args("--teacher", "tv_resnet18", "--teacher-weights", "IMAGENET1K_V1", "--teacher-epochs", 1,
                     *data_flags, "--checkpoint-dir", "own", method_args=bkd.add_args)
    data = common.load_data(args, torch.device("cpu"))
    teacher = common.load_teacher(args, data)  # none in own/: fine-tuned first
    assert teacher.source["file"] == str(Path("own") / saved.parent.name / saved.name)
    expected = torch.load(saved, weights_only=True)["model"]
    assert all(torch.equal(v, expected[k]) for k, v in teacher.state_dict().items())
    from_scratch = make_args("--teacher", "tv_resnet18", "--teacher-epochs", 1, *data_flags,
                             method_args=bkd.add_args)
    assert common.teacher_candidates(from_scratch, data)[0].name == "tv_resnet18_1ep.pth"


def test_missing_teacher_is_trained_then_found_and_only_for_its_epochs(tmp_path, synthetic_data, capsys,
                                                                      monkeypatch):
    args = make_args("--dataset", "synthetic", "--train-subset", 640, "--teacher", "resnet8",
                     "--teacher-epochs", 1, "--checkpoint-dir", tmp_path)
    teacher = common.load_teacher(args, synthetic_data)
    assert "training it first" in capsys.readouterr().out
    short = tmp_path / "synthetic-subset640" / "resnet8_1ep.pth"  # not resnet8.pth, the 240-epoch teacher's place
    assert short.exists()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    again = common.load_teacher(args, synthetic_data)
    assert "training it first" not in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), again.state_dict().values()))
    record = common.teacher_record(again)  # what summary.json records of the teacher used
    assert record["file"] == str(short) and record["epochs"] == 1 and record["data"] == synthetic_data.fingerprint
    assert record["arch"] == "resnet8" and record["accuracy"] == torch.load(short, weights_only=True)["accuracy"]

    # A run of the standard 240 epochs does not take the 1-epoch teacher: it trains its own beside it ...
    def train_teacher(args, data, teacher, target):
        raise RuntimeError(f"would train {args.teacher_epochs} epochs into {target}")
    monkeypatch.setattr(common, "train_teacher", train_teacher)
    standard_argv = ["--dataset", "synthetic", "--train-subset", 640, "--teacher", "resnet8", "--checkpoint-dir", tmp_path]
    standard = make_args(*standard_argv)
    with pytest.raises(RuntimeError, match="would train 240 epochs into .*synthetic-subset640/resnet8.pth$"):
        common.load_teacher(standard, synthetic_data)
    # ... and a short teacher put in its place is refused, not used.
    shutil.copy(short, short.with_name("resnet8.pth"))
    with pytest.raises(SystemExit, match=r"resnet8.pth holds a 1-epoch teacher, not the 240-epoch one this run asks"):
        common.load_teacher(standard, synthetic_data)
    # Given by name it is taken as it is, and recorded as what it is.
    explicit = make_args(*standard_argv, "--teacher-ckpt", short)
    assert common.teacher_record(common.load_teacher(explicit, synthetic_data))["epochs"] == 1


def noise_folder(root, seed):
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_teachers_of_folders_with_the_same_name_are_kept_apart(tmp_path, capsys):
    datasets = []
    for name, seed in (("a", 0), ("b", 1)):
        args = argparse.Namespace(dataset="folder", data_dir=str(noise_folder(tmp_path / name / "images", seed)),
                                  train_subset=0, checkpoint_dir=str(tmp_path / "checkpoints"), teacher="resnet8",
                                  teacher_ckpt=None, teacher_epochs=240, amp=None, channels_last=None)
        datasets.append((args, common.load_data(args, torch.device("cpu"))))
    (args_a, data_a), (args_b, data_b) = datasets
    path_a, path_b = (common.teacher_path(a, d, "resnet8") for a, d in datasets)
    assert path_a != path_b and path_a.parent.name.startswith("folder-images-")
    # A cached teacher records its data; one found in the cache of other data is refused.
    model = common.build_model("resnet8", 2, torch.device("cpu"))
    path_b.parent.mkdir(parents=True)
    common.save_atomic(common.model_file(model, 1, 50.0, data_a), path_b)
    with pytest.raises(SystemExit, match="was trained on other data"):
        common.load_teacher(args_b, data_b)


def test_a_teacher_being_made_by_another_process_is_waited_for_and_used(tmp_path, monkeypatch, capsys):
    """Two runs that need the same missing teacher: the one that claims it second waits, then uses the first's
    teacher instead of training its own over it (the other process stands in as a thread holding the claim)."""
    monkeypatch.chdir(tmp_path)
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", "made_elsewhere")
    target = tmp_path / TEACHER_FILE
    target.parent.mkdir(parents=True)
    other = files.FileLock(target.with_name(f".{target.name}.lock"))
    assert other.acquire()

    def the_other_run_finishes():
        target.write_bytes((tmp_path / "made_elsewhere" / "model.pth").read_bytes())
        other.release()
    threading.Timer(1.0, the_other_run_finishes).start()
    run(monkeypatch, bkd.main, *METHOD_RUN, "--out-dir", "waited")
    out = capsys.readouterr().out
    assert f"another process is making the teacher {TEACHER_FILE} (it holds " in out and "waiting for it" in out
    assert f"the teacher {TEACHER_FILE} was made by another process meanwhile: this run uses it" in out
    assert "training it first" not in out, out
    assert not list((tmp_path / "checkpoints" / "synthetic-subset100").glob("*_run_*"))
    assert target.read_bytes() == (tmp_path / "made_elsewhere" / "model.pth").read_bytes()  # not replaced


def test_save_as_teacher_is_refused_while_another_process_makes_that_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / TEACHER_FILE).parent.mkdir(parents=True)
    other = files.FileLock((tmp_path / TEACHER_FILE).with_name(".resnet8_1ep.pth.lock"))
    assert other.acquire()
    message = refused(monkeypatch, capsys, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--out-dir", "a",
                      "--save-as-teacher")
    assert message.startswith(f"error: another process is making the teacher {TEACHER_FILE} (it holds ")
    assert not (tmp_path / "a" / "checkpoint.pt").exists()  # refused before training
    other.release()


def test_a_run_resumes_with_its_own_teacher_whatever_the_cache_holds_later(tmp_path, monkeypatch, capsys):
    """The cache's teacher replaced after a run (another seed's, or --overwrite): the run keeps a copy (a hard
    link) of the teacher it was distilled from, and its --resume uses that copy; a fresh run uses the new one."""
    monkeypatch.chdir(tmp_path)
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--seed", 1, "--out-dir", "t1",
        "--save-as-teacher")
    run(monkeypatch, bkd.main, *METHOD_RUN, "--out-dir", "distilled")
    first = torch.load(tmp_path / "distilled" / "teacher.pth", weights_only=True)["model"]
    run(monkeypatch, common.main, "--model", "resnet8", *TINY, "--epochs", 1, "--seed", 2, "--out-dir", "t2",
        "--save-as-teacher", "--overwrite")
    assert f"replaced the earlier teacher {TEACHER_FILE}" in capsys.readouterr().out
    run(monkeypatch, bkd.main, *METHOD_RUN, "--out-dir", "distilled", "--resume")
    out = capsys.readouterr().out
    assert "teacher resnet8 from the run's own copy distilled/teacher.pth" in out and "(finished" in out
    saved = torch.load(tmp_path / "distilled" / "teacher.pth", weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in first.items())
    assert read_summary_teacher(tmp_path / "distilled") == common.fingerprint(*first.values())


def read_summary_teacher(folder):
    return json.loads((folder / "summary.json").read_text())["teacher"]["weights"]

"""SSKD (sskd.py): adapters, the stage loss, each phase training only its part, resume across phases, runs."""
import json
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import sskd
from models import create_model, feature_shapes, stage_features
from conftest import (ROOT, TEACHER_FILE, changed_keys, data_slice, frozen, make_args, method_run, read_summary,
                      snapshot, tiny_model)


def sskd_args(out_dir, *extra):
    return make_args("--dataset", "synthetic", "--epochs", 8, "--batch-size", 32, "--out-dir", out_dir, *extra,
                     method_args=sskd.add_args)


@pytest.fixture(scope="module")
def sskd_data(synthetic_data):
    """320 training images (32 per class, 10 steps of 32) and 250 test images: enough to learn, quick on a
    CPU. (The session's trained teacher saw these 320 among its 640.)"""
    return data_slice(synthetic_data, 320, 250)


@pytest.fixture(scope="module")
def full_run(sskd_data, trained_teacher, tmp_path_factory):
    """An uninterrupted resnet8 -> resnet8 run, 2 epochs per phase, from the session's trained teacher; also
    the names of the teacher's state that changed in the run (none may)."""
    out_dir = tmp_path_factory.mktemp("full")
    student = tiny_model("resnet8", seed=0)
    teacher_before = snapshot(trained_teacher)
    summary = sskd.distill(sskd_args(out_dir), sskd_data, trained_teacher, student)
    return out_dir, summary, student, changed_keys(trained_teacher, teacher_before)


def names_in(model, module):
    """state_dict names of `model` whose tensors belong to `module` (a view)."""
    ids = {id(t) for t in module.state_dict(keep_vars=True).values()}
    return {name for name, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


@torch.no_grad()
def stage_outputs(model, x):
    model.eval()
    return stage_features(model, x)[0]


# ----------------------------------------------------------------------------------------- adapters

def test_adapters_are_identity_exactly_when_shapes_match():
    for teacher, student, identity in [("resnet32x4", "resnet8x4", True), ("wrn_40_2", "wrn_16_2", True),
                                       ("resnet56", "resnet20", True), ("resnet32x4", "resnet20", False)]:
        pairs = zip(feature_shapes(create_model(student)), feature_shapes(create_model(teacher)))
        kinds = [isinstance(sskd.make_adapter(s, t), nn.Identity) for s, t in pairs]
        assert kinds == [identity] * 3, (teacher, student)
    # Every form of mismatch maps the student's feature onto the teacher's shape.
    for student_shape, teacher_shape in [((16, 32, 32), (64, 8, 8)), ((64, 8, 8), (16, 32, 32)),
                                         ((64, 32), (16, 32, 32)), ((32, 16, 16), (64, 192)),
                                         ((64, 32), (64, 48))]:
        adapter = sskd.make_adapter(student_shape, teacher_shape)
        assert isinstance(adapter, sskd.Adapter)
        assert adapter(torch.randn(2, *student_shape)).shape == (2, *teacher_shape)


def test_teacher_input_needs_matching_shapes():
    sskd.check_teacher_input(create_model("resnet20", 10), create_model("resnet56", 10))
    with pytest.raises(SystemExit, match="--teacher-input.*stage 1.*wrn_16_2"):
        sskd.check_teacher_input(create_model("resnet8", 10), create_model("wrn_16_2", 10))


# ------------------------------------------------------------------------------------------- the loss

def test_stage_loss_is_the_plain_mse():
    teacher, student = frozen(tiny_model("wrn_16_2", seed=1)), tiny_model("resnet8", seed=2).eval()
    x = torch.randn(4, 3, 32, 32)
    adapters = {1: sskd.make_adapter((32, 16, 16), (64, 16, 16)).eval()}
    (distance,) = sskd.feature_distances(student, teacher, adapters, x, [1])
    with torch.no_grad():
        target = teacher.block2(teacher.block1(teacher.conv1(x)))
        z = student.layer2(student.layer1(student.relu(student.bn1(student.conv1(x)))))
        by_hand = ((adapters[1].bn(adapters[1].conv(z)) - target) ** 2).mean()
    assert torch.allclose(distance, by_hand, rtol=1e-5, atol=0)
    # Gradients reach stage 2 and its adapter, never stage 1 or the teacher.
    distance.backward()
    assert student.layer2[0].conv1.weight.grad is not None and adapters[1].conv.weight.grad is not None
    assert student.conv1.weight.grad is None and student.layer1[0].conv1.weight.grad is None
    # --teacher-input: stage 2 is fed the teacher's stage-1 output instead of the student's.
    teacher = frozen(tiny_model("resnet8", seed=3))
    (distance,) = sskd.feature_distances(student, teacher, {1: nn.Identity()}, x, [1], teacher_input=True)
    with torch.no_grad():
        t1 = teacher.layer1(teacher.relu(teacher.bn1(teacher.conv1(x))))
        expected = F.mse_loss(student.layer2(t1), teacher.layer2(t1))
    assert torch.equal(distance, expected)


def test_joint_trains_the_whole_backbone_and_the_budget_is_split():
    teacher, student = frozen(tiny_model("resnet8", seed=1)), tiny_model("resnet8", seed=2)
    adapters = {k: nn.Identity() for k in range(3)}
    distances = sskd.feature_distances(student, teacher, adapters, torch.randn(4, 3, 32, 32), [0, 1, 2])
    assert len(distances) == 3
    distances[2].backward()  # the last stage's loss reaches the stem when the backbone is trained jointly
    assert student.conv1.weight.grad is not None and student.fc.weight.grad is None
    plan = sskd.phase_plan(sskd_args("x", "--epochs", 240), 3)
    assert plan == ([("stage1", [0], 72), ("stage2", [1], 72), ("stage3", [2], 72)], 24)

    def epochs(*argv):
        backbone, head = sskd.phase_plan(sskd_args("x", *argv), 3)
        return [epochs for *_, epochs in backbone] + [head]
    assert epochs("--epochs", 20) == [6, 6, 6, 2] and epochs("--epochs", 1) == [1, 1, 1, 1]
    plan = sskd.phase_plan(sskd_args("x", "--joint", "--stage-epochs", 5, "--head-epochs", 7), 3)
    assert plan == ([("joint", [0, 1, 2], 15)], 7)


def test_reset_head_reinitialises_linear_and_norm():
    for name, norm in [("vit", "norm"), ("wrn_16_1", "bn1")]:
        model = tiny_model(name, seed=0)
        with torch.no_grad():
            for p in list(model.fc.parameters()) + list(getattr(model, norm).parameters()):
                p.fill_(5.0)
        stem = model.stages()[0][0].state_dict()
        sskd.reset_head(model)
        assert torch.equal(getattr(model, norm).weight, torch.ones_like(getattr(model, norm).weight))
        assert (model.fc.weight != 5).all() and (model.fc.bias != 5).all()
        assert all(torch.equal(v, model.stages()[0][0].state_dict()[k]) for k, v in stem.items())


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class ScaledStages(nn.Module):
    """`model` whose every stage output is multiplied by `factor` (and divided by it again where the next stage
    or the head reads it): the same network, with stage outputs `factor` times larger, as torchvision's
    ResNets' are against the CIFAR zoo's. Its parameters are `model`'s."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor, self.arch = model, factor, model.arch
        self.train(model.training)  # a frozen teacher stays in eval mode (feature_shapes restores the mode)

    def stages(self):
        up, down = Scale(self.factor), Scale(1 / self.factor)
        return [nn.Sequential(*([down] if k else []), stage, up) for k, stage in enumerate(self.model.stages())]

    def head(self):
        return nn.Sequential(Scale(1 / self.factor), self.model.head())


def test_stage_phase_does_not_depend_on_the_feature_scale(sskd_data, trained_teacher, tmp_path):
    """The same teacher and student with every stage output 128 times larger (a power of two: every scaling
    is exact in floating point) train exactly alike with the default --feat-norm teacher-energy: the
    measured energies are 128^2 times larger, the loss is the same, and so are the trained weights. With the
    plain MSE (--feat-norm none) the larger scale is a 128^2 times larger gradient (the torchvision ResNets'
    case, where stage 3 diverged)."""
    factor = 128
    shapes = sskd.stage_shapes(tiny_model("resnet8"), trained_teacher, 32)
    args = sskd_args(tmp_path, "--epochs", 1)
    energies = sskd.teacher_energies(trained_teacher, sskd_data, [0, 1, 2], shapes, args)
    scaled_energies = sskd.teacher_energies(ScaledStages(trained_teacher, factor), sskd_data, [0, 1, 2], shapes, args)
    assert all(scaled_energies[k] == factor ** 2 * energies[k] for k in range(3)), (energies, scaled_energies)

    def stage2_phase(scale, *flags):
        student = tiny_model("resnet8", seed=0)
        teacher = ScaledStages(trained_teacher, scale) if scale != 1 else trained_teacher
        model = ScaledStages(student, scale) if scale != 1 else student
        out_dir = tmp_path / f"scale{scale}{''.join(flags)}"
        summary = sskd.train_backbone(sskd_args(out_dir, "--epochs", 2, *flags), sskd_data, model, teacher, [1], 2,
                                      out_dir)
        energy = sskd.teacher_energies(teacher, sskd_data, [1], shapes, args)[1]
        return student, summary["last_epoch"]["feat_mse"] / energy

    x = sskd_data.normalize(sskd_data.test_x)
    with torch.no_grad():
        start = sskd.feature_distances(tiny_model("resnet8", seed=0).eval(), trained_teacher,
                                       {1: nn.Identity()}, x, [1])[0].item() / energies[1]
    student, relative = stage2_phase(1)
    scaled_student, scaled_relative = stage2_phase(factor)
    assert relative < 0.5 * start, (relative, start)  # the phase learns: measured 0.92 -> 0.38
    assert scaled_relative == pytest.approx(relative, rel=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), scaled_student.state_dict().values()))
    # The plain MSE: unchanged at scale 1 (a weight of 10 on the raw error), not scale-free.
    _, plain = stage2_phase(1, "--feat-norm", "none")
    try:
        _, scaled_plain = stage2_phase(factor, "--feat-norm", "none")
    except FloatingPointError:  # the loss became inf or NaN: fit stops the run
        scaled_plain = float("inf")
    assert scaled_plain != pytest.approx(plain, rel=0.1)


# ------------------------------------------------------------------------------------------- phases

@pytest.mark.parametrize("teacher_name,student_name", [("wrn_16_2", "resnet8"), ("resnet8", "vit"),
                                                       ("mlp_mixer", "resnet8")])
def test_each_phase_changes_only_its_part(teacher_name, student_name, sskd_data, tmp_path):
    teacher, student = frozen(tiny_model(teacher_name, seed=1)), tiny_model(student_name, seed=2)
    args = sskd_args(tmp_path, "--epochs", 1)
    x = sskd_data.normalize(sskd_data.test_x[:8])
    stage2, head = student.stages()[1], student.head()
    keys = list(student.state_dict())

    # Phase A, stage 2: only stage 2 (parameters and BatchNorm buffers) and its adapter change.
    before, outputs_before = snapshot(student), stage_outputs(student, x)
    summary = sskd.train_backbone(args, sskd_data, student, teacher, [1], 1, tmp_path / "stage2")
    changed = changed_keys(student, before)
    assert changed and changed <= names_in(student, stage2)
    assert torch.equal(stage_outputs(student, x)[0], outputs_before[0])
    assert list(student.state_dict()) == keys  # the adapter never became part of the student
    checkpoint = torch.load(tmp_path / "stage2" / "checkpoint.pt", weights_only=True)
    assert "conv.weight" in checkpoint["train_modules"][1]  # shapes differ: a Conv1x1 + BN adapter
    optimized = len(checkpoint["optimizer"]["param_groups"][0]["params"])
    assert optimized == len(list(stage2.parameters())) + 3  # + the adapter's conv weight, BN weight and bias
    assert summary["last_epoch"]["feat_mse"] > 0 and summary["last_acc"] is None

    # Phase B: only the head changes; every stage's output stays bit-identical.
    before, outputs_before = snapshot(student), stage_outputs(student, x)
    summary = sskd.train_head(args, sskd_data, student, 1, tmp_path / "head")
    changed = changed_keys(student, before)
    assert changed and changed <= names_in(student, head)
    assert all(torch.equal(a, b) for a, b in zip(stage_outputs(student, x), outputs_before))
    assert summary["last_acc"] is not None


def test_run_lowers_every_stage_distance_and_learns_a_head(full_run, sskd_data, trained_teacher):
    out_dir, summary, student, teacher_changes = full_run
    assert teacher_changes == set()  # the frozen teacher, BatchNorm buffers included, is what it was
    fresh = tiny_model("resnet8", seed=0).eval()
    x = sskd_data.normalize(sskd_data.test_x)
    with torch.no_grad():
        identity = {k: nn.Identity() for k in range(3)}
        initial = sskd.feature_distances(fresh, trained_teacher, identity, x, [0, 1, 2])
    final = [summary["stage_feat_mse"][f"stage{k}"] for k in (1, 2, 3)]
    assert all(f < 0.3 * i for f, i in zip(final, initial)), (final, initial)  # measured: 0.11 to 0.14
    assert summary["last_acc"] > 60  # chance is 10 %; measured 91
    # Each phase logged its test metric: the feature MSE for the stages, the accuracy for the head.
    for k in (1, 2, 3):
        rows = [json.loads(r) for r in (out_dir / f"stage{k}" / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and "test_acc" not in rows[-1]
        assert rows[-1]["feat_mse"] == pytest.approx(final[k - 1])
        energy = summary["teacher_feature_energy"][f"stage{k}"]  # --feat-weight 10, --feat-norm teacher-energy
        assert rows[-1]["train_loss"] == pytest.approx(10 * rows[-1]["train_feat_mse"] / energy, rel=1e-5)
        assert summary["stage_feat_mse_relative"][f"stage{k}"] == pytest.approx(final[k - 1] / energy)
        assert not (out_dir / f"stage{k}" / "model.pth").exists()
    saved = json.loads((out_dir / "summary.json").read_text())
    assert saved["last_acc"] == summary["last_acc"] and saved["epochs"] == 2 + 2 + 2 + 1  # --epochs 8
    assert set(saved["phases"]) == {"stage1", "stage2", "stage3", "head"}
    # The final student, in the benchmark format with the zoo's keys, loads strictly.
    reloaded = create_model("resnet8", 10)
    checkpoint = common.load_weights(reloaded, out_dir / "model.pth")
    assert list(checkpoint["model"]) == list(create_model("resnet8", 10).state_dict())
    assert checkpoint["accuracy"] == summary["last_acc"]
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), student.state_dict().values()))


def test_the_log_says_what_each_phase_measured_and_trains(finished_runs):
    """A stage phase measures no accuracy: its last line gives its test feature error, not 'last acc None'; the
    head phase trains the head's parameters, which its first line counts beside the model's."""
    log = finished_runs["sskd"][1]
    assert "None" not in log
    done = [line for line in log.splitlines() if line.startswith("done in")]
    assert len(done) == 4 and all(" last feat_mse " in line for line in done[:3]) and " last acc " in done[3]
    head_params = sum(p.numel() for p in create_model("resnet8", 10).head().parameters())
    [head_line] = [line for line in log.splitlines() if line.startswith("SSKD head of resnet8: ")]
    assert f" 78,042 params, {head_params:,} trained, " in head_line
    assert "10 classes, on the device (pad-crop), fingerprint" in log  # the pipeline, named at 32 px too


def test_resume_continues_in_the_phase_it_was_killed_in(full_run, sskd_data, trained_teacher, tmp_path,
                                                        monkeypatch):
    calls = {"stage2 steps": 0}
    real_distances = sskd.feature_distances

    def dies_in_stage2_epoch2(student, teacher, adapters, x, trained, teacher_input=False):
        if trained == [1] and torch.is_grad_enabled():
            calls["stage2 steps"] += 1
            if calls["stage2 steps"] == 12:  # 10 steps per epoch: the second step of epoch 2
                raise KeyboardInterrupt
        return real_distances(student, teacher, adapters, x, trained, teacher_input)

    monkeypatch.setattr(sskd, "feature_distances", dies_in_stage2_epoch2)
    with pytest.raises(KeyboardInterrupt):
        sskd.distill(sskd_args(tmp_path), sskd_data, trained_teacher, tiny_model("resnet8", seed=0))
    assert (tmp_path / "stage1" / "summary.json").exists() and not (tmp_path / "stage2" / "summary.json").exists()
    stage1_written = (tmp_path / "stage1" / "checkpoint.pt").stat().st_mtime_ns

    monkeypatch.setattr(sskd, "feature_distances", real_distances)
    sskd.distill(sskd_args(tmp_path, "--resume"), sskd_data, trained_teacher, tiny_model("resnet8", seed=0))
    assert (tmp_path / "stage1" / "checkpoint.pt").stat().st_mtime_ns == stage1_written  # not redone
    assert len((tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()) == 2
    full = torch.load(full_run[0] / "model.pth", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "model.pth", weights_only=True)["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_joint_and_finetune_all_ablations_train_what_they_say(sskd_data, tmp_path):
    teacher, student = frozen(tiny_model("resnet8", seed=1)), tiny_model("resnet8", seed=2)
    args = sskd_args(tmp_path, "--joint", "--finetune-all", "--stage-epochs", 1, "--head-epochs", 1)
    summary = sskd.distill(args, sskd_data, teacher, student)
    assert set(summary["phases"]) == {"joint", "head"} and set(summary["stage_feat_mse"]) == {"stage1", "stage2", "stage3"}
    assert summary["phases"]["joint"]["epochs"] == 3 and summary["epochs"] == 4

    def optimized(phase):
        checkpoint = torch.load(tmp_path / phase / "checkpoint.pt", weights_only=True)
        return len(checkpoint["optimizer"]["param_groups"][0]["params"])
    backbone = sum(len(list(stage.parameters())) for stage in student.stages())
    assert optimized("joint") == backbone  # identity adapters: nothing else to train
    assert optimized("head") == len(list(student.parameters()))


def test_sskd_script(finished_runs, workdir):
    summary, weights, teacher = method_run(finished_runs, workdir, "sskd")  # --epochs 1: 1 epoch per phase
    out_dir = finished_runs["sskd"][0]
    assert {name: phase["epochs"] for name, phase in summary["phases"].items()} == \
        {"stage1": 1, "stage2": 1, "stage3": 1, "head": 1}
    assert summary["epochs"] == 4 and (out_dir / "head" / "summary.json").exists()
    assert set(summary["stage_feat_mse"]) == {"stage1", "stage2", "stage3"}
    assert all(isinstance(v, float) and v >= 0 for v in summary["stage_feat_mse"].values())
    assert not torch.equal(weights["conv1.weight"], teacher["conv1.weight"])


@pytest.fixture(scope="module")
def sskd_probe():
    """benchmarks/sskd_probe.py as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sskd_probe
    return sskd_probe


def test_the_probe_of_a_finished_run_measures_what_the_run_logged(finished_runs, workdir, sskd_probe):
    """benchmarks/sskd_probe.py on the finished 1-epoch-per-phase run: the student's accuracy and each stage's
    test MSE as the run logged them (a frozen stage does not drift in later phases), the teacher's as
    load_teacher measured it."""
    out_dir = finished_runs["sskd"][0]
    result = sskd_probe.probe(out_dir, workdir / TEACHER_FILE, workdir / "data", test_subset=100)
    summary = read_summary(out_dir)
    assert result["student"] == pytest.approx(summary["last_acc"], abs=1.01)  # at most 1 of 100 images
    assert result["teacher"] == pytest.approx(summary["teacher"]["test_acc"], abs=1.01)
    assert result["stage MSE"] == pytest.approx([summary["stage_feat_mse"][f"stage{k}"] for k in (1, 2, 3)], rel=1e-3)
    assert 0 <= result["teacher head on student body"] <= 100 and len(result["stage MSE / E_k (%)"]) == 3


def test_the_probe_refuses_a_run_whose_stages_it_cannot_compare(tmp_path, sskd_probe):
    """A pair with adapters (their weights are not kept) or a --teacher-input run: one line, nothing loaded."""
    cases = {"adapted": {"student": "wrn_16_2"}, "teacher_input": {"student": "resnet8", "teacher_input": True}}
    for name, flags in cases.items():
        run_dir = tmp_path / name
        run_dir.mkdir()
        config = {"dataset": "synthetic", "train_subset": 100, "teacher": "resnet8", **flags}
        (run_dir / "run.json").write_text(json.dumps({"config": config}))
        with pytest.raises(SystemExit, match=f"error: {run_dir} is not a run this probe reads"):
            sskd_probe.probe(run_dir, tmp_path / "no_teacher.pth", tmp_path, test_subset=100)

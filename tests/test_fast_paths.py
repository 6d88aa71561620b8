"""The fast paths on a CPU: bf16 autocast + channels_last against fp32, float32 where needed, compile (slow).

The fast paths on a CPU: the flags, bf16 autocast + channels_last against the fp32 run, the dtypes that must
stay float32 under autocast, and `--compile` against eager (those tests are marked slow).

Every run here is the real loop (`common.fit`, `blockwise_kd.distill`, `sskd.distill`, `lfcc.distill`) on tiny
synthetic data, compared through what it logs to metrics.jsonl."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import blockwise_kd as bkd
import common
import lfcc
import models
import sskd
from collections import defaultdict
from conftest import data_slice, frozen, make_args, tiny_model

CPU = torch.device("cpu")
METHODS = ["alone", "blockwise_kd", "sskd", "lfcc"]
FP32 = ("--amp", "off", "--no-channels-last")
BF16 = ("--amp", "bf16", "--channels-last")


def fast(*argv):
    return common.fast_paths(make_args(*argv), CPU)


# ------------------------------------------------------------------------------------------- the flags

def test_fast_path_flags_on_cpu():
    default = fast()
    assert default.amp is False and default.compile is None  # CPU defaults: fp32, eager
    assert isinstance(default.channels_last, bool)  # its CPU default may change; the flags decide below
    assert fast("--amp", "bf16").amp is True and fast("--amp", "off").amp is False
    assert fast("--channels-last").channels_last is True
    assert fast("--no-channels-last").channels_last is False
    assert fast("--compile").compile == "default"
    assert fast("--compile", "reduce-overhead").compile == "reduce-overhead"
    assert fast("--compile", "--amp", "bf16").compile == "default"  # MODE is optional before another flag
    assert fast("--amp", "bf16").compile is None and fast("--compile").amp is False  # independent flags
    everything = fast("--amp", "bf16", "--channels-last", "--compile", "max-autotune")
    assert (everything.amp, everything.channels_last, everything.compile) == (True, True, "max-autotune")
    line = common.describe(everything)  # the start-of-run log line names each of them
    assert "amp bf16" in line and "channels_last on" in line and "compile max-autotune" in line
    assert "amp off" in common.describe(fast(*FP32)) and "channels_last off" in common.describe(fast(*FP32))
    for bad in (("--amp", "fp16"), ("--compile", "fast")):
        with pytest.raises(SystemExit):
            make_args(*bad)


# ------------------------------------------------------------------------------------------- the runs

def build_teacher(method, channels_last):
    """An untrained frozen teacher (the comparisons need no knowledge in it), in channels_last when the run
    is, as common.load_teacher does. SSKD's is narrower than the student, so that every stage has an
    Adapter (Conv1x1 + BatchNorm) rather than the identity."""
    teacher = tiny_model("narrow_resnet8" if method == "sskd" else "resnet8", seed=1)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    return frozen(teacher)


class Recorder:
    """The dtypes of tensors seen inside a run, by name, and the modules a method built internally.

    With record_dtypes=False it records modules only: under torch.compile, each new dtype in `dtypes` fails a
    dynamo guard and recompiles the whole train step, which the compile tests need not pay for."""

    def __init__(self, record_dtypes=True):
        self.record_dtypes, self.dtypes, self.modules = record_dtypes, defaultdict(set), defaultdict(list)

    def __call__(self, name, *tensors):
        if self.record_dtypes:
            for t in tensors:
                self.dtypes[name].add(t.dtype)

    def training_output(self, name):
        """A forward hook recording the output dtype of a module while it trains."""
        return lambda module, inputs, output: self(name, output) if module.training else None


def train(method, data, out_dir, *flags, record_dtypes=True):
    """One seeded run of `method` with `flags`; returns (student, {name: trained helper modules}, Recorder).

    The method's own functions are wrapped (not replaced) to record the dtypes that flow through them."""
    out_dir = Path(out_dir)
    argv = ("--dataset", "synthetic", "--out-dir", out_dir, *flags)
    rec = Recorder(record_dtypes)
    with pytest.MonkeyPatch.context() as mp:
        if method == "alone":
            args = make_args(*argv)
            torch.manual_seed(0)
            student = models.create_model("resnet8", 10)
            student.fc.register_forward_hook(rec.training_output("student logits"))
            common.fit(student, data, out_dir, common.make_recipe(args, "cnn"), **common.run_options(args))
            return student, {}, rec

        if method == "blockwise_kd":
            args = make_args(*argv, method_args=bkd.add_args)
            real_loss, real_distance = bkd.blockkd_loss, bkd.kd_loss

            def blockkd_loss(student_logits, teacher_logits, stone_logits, *rest, **kwargs):
                rec("student logits", student_logits)
                rec("stepping-stone logits", *stone_logits.values())
                loss, terms = real_loss(student_logits, teacher_logits, stone_logits, *rest, **kwargs)
                rec("blockkd_loss", loss, *terms.values())
                return loss, terms

            def kd_loss(*a, **kw):
                distance = real_distance(*a, **kw)
                rec("kd_loss", distance)
                return distance

            class SteppingStones(bkd.SteppingStones):
                def __init__(self, *a, **kw):
                    super().__init__(*a, **kw)
                    rec.modules["stepping-stones"].append(self)

            mp.setattr(bkd, "blockkd_loss", blockkd_loss)
            mp.setattr(bkd, "kd_loss", kd_loss)
            mp.setattr(bkd, "SteppingStones", SteppingStones)
            teacher = build_teacher(method, common.fast_paths(args, CPU).channels_last)
            torch.manual_seed(0)
            student = models.create_model("resnet8", 10)
            bkd.distill(args, data, teacher, student)
            return student, {"stepping-stones": rec.modules["stepping-stones"]}, rec

        if method == "sskd":
            args = make_args(*argv, method_args=sskd.add_args)
            real_adapter, real_distances = sskd.make_adapter, sskd.feature_distances

            def make_adapter(*a, **kw):
                adapter = real_adapter(*a, **kw)
                adapter.register_forward_hook(rec.training_output("adapter output"))
                rec.modules["adapters"].append(adapter)
                return adapter

            def feature_distances(*a, **kw):
                distances = real_distances(*a, **kw)
                rec("feature_distances", *distances)
                return distances

            mp.setattr(sskd, "make_adapter", make_adapter)
            mp.setattr(sskd, "feature_distances", feature_distances)
            teacher = build_teacher(method, common.fast_paths(args, CPU).channels_last)
            torch.manual_seed(0)
            student = models.create_model("resnet8", 10)
            student.fc.register_forward_hook(rec.training_output("student logits"))  # the head phase
            sskd.distill(args, data, teacher, student)
            adapters = rec.modules["adapters"]
            assert len(adapters) == 3 and all(isinstance(a, sskd.Adapter) for a in adapters)
            return student, {"adapters": rec.modules["adapters"]}, rec

        if method == "lfcc":
            args = make_args(*argv, method_args=lfcc.add_args)
            real_alignment, real_info_nce = lfcc.stage_alignment, lfcc.info_nce

            def stage_alignment(*a, **kw):
                student_logits, teacher_logits, per_stage = real_alignment(*a, **kw)
                if torch.is_grad_enabled():  # training steps
                    rec("student logits", student_logits)
                    rec("alignment losses", *(loss for loss, _ in per_stage))
                return student_logits, teacher_logits, per_stage

            def info_nce(z_student, z_teacher, tau, **kw):
                rec("compact-space embeddings", z_student, z_teacher)
                loss, accuracy = real_info_nce(z_student, z_teacher, tau, **kw)
                rec("info_nce", loss)
                return loss, accuracy

            class CompactSpace(lfcc.CompactSpace):
                def __init__(self, *a, **kw):
                    super().__init__(*a, **kw)
                    rec.modules["compact space"].append(self)
                    for projector in [*self.student, *self.teacher]:
                        projector.register_forward_hook(rec.training_output("projector output"))

            mp.setattr(lfcc, "stage_alignment", stage_alignment)
            mp.setattr(lfcc, "info_nce", info_nce)
            mp.setattr(lfcc, "CompactSpace", CompactSpace)
            teacher = build_teacher(method, common.fast_paths(args, CPU).channels_last)
            student = tiny_model("mlp_mixer", seed=0)
            lfcc.distill(args, data, teacher, student)
            return student, {"compact space": rec.modules["compact space"]}, rec
    raise ValueError(method)


def logged(out_dir):
    """Every logged value of a run (all phases of SSKD), by 'phase epoch key', timings left out."""
    values = {}
    for path in sorted(Path(out_dir).rglob("metrics.jsonl")):
        phase = path.parent.relative_to(out_dir).as_posix()
        for row in map(json.loads, path.read_text().splitlines()):
            for key, value in row.items():
                if key not in ("epoch", "images_per_sec", "seconds"):
                    values[f"{phase} epoch {row['epoch']} {key}"] = value
    assert values, f"nothing logged under {out_dir}"
    return values


def is_accuracy(name):
    """test_acc, stone<i>_acc, rank_acc_s<k>, test_rank_acc_s<k>: percentages of whole samples, which move
    in steps of one sample when a prediction flips."""
    return "acc" in name.split()[-1]


def disagreements(reference, other, rel, accuracy_points):
    """Names (with both values) where `other` is not within tolerance of `reference`, or not finite."""
    assert reference.keys() == other.keys()
    bad = []
    for name, want in reference.items():
        got = other[name]
        if not (math.isfinite(want) and math.isfinite(got)):
            bad.append((name, want, got))
        elif is_accuracy(name):
            if abs(got - want) > accuracy_points:
                bad.append((name, want, got))
        elif abs(got - want) > rel * abs(want) + 1e-6:
            bad.append((name, want, got))
    return bad


def float32_state(module):
    """Every parameter and floating-point buffer is float32 (BatchNorm's num_batches_tracked is int64)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name.endswith("num_batches_tracked"):
            assert tensor.dtype == torch.int64, name
        else:
            assert tensor.dtype == torch.float32, (name, tensor.dtype)


def first_spatial_conv(model):
    """A conv weight whose NCHW and NHWC layouts differ (a 1x1 kernel's are both 'contiguous' in either)."""
    return next(m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))


# ----------------------------------------------------------------------- bf16 + channels_last vs fp32

@pytest.fixture(scope="module")
def tiny_data(synthetic_data):
    """128 of the training images (4 steps of 32; 8 to 18 of each class) and 100 test images (10 of each):
    each run below takes well under a second on one core."""
    return data_slice(synthetic_data, 128, 100)


# One short epoch (SSKD: one per phase, stage 1, 2, 3 and head), batch 32, the recipe's learning rate.
SHORT = {"alone": ("--epochs", 1, "--batch-size", 32), "blockwise_kd": ("--epochs", 1, "--batch-size", 32),
         "sskd": ("--epochs", 4, "--batch-size", 32), "lfcc": ("--epochs", 1, "--batch-size", 32)}


@pytest.fixture(scope="module")
def short_runs(tiny_data, tmp_path_factory):
    """runs[method, 'fp32' | 'bf16'] -> (out_dir, student, helper modules, Recorder), each run done once."""
    done = {}

    class Runs:
        def __getitem__(self, key):
            if key not in done:
                method, mode = key
                out_dir = tmp_path_factory.mktemp(f"{method}_{mode}")
                flags = {"fp32": FP32, "bf16": BF16}[mode]
                done[key] = (out_dir, *train(method, tiny_data, out_dir, *SHORT[method], *flags))
            return done[key]
    return Runs()


# bf16 against fp32 after 4 steps (one short epoch; SSKD: 4 steps in each of its 4 phases). Measured on
# the CPU (torch 2.14): the largest relative difference of any logged loss or term is 0.19 % (SSKD's test
# feature MSE of stage 1 and 3), the training losses differ by at most 0.07 %; accuracies differed by at
# most one test sample (1 point of 100 test images). Tolerances: 1 % relative for losses and terms (5x
# the largest measured), 3 points for accuracies (3 of the 100 test images; a training rank accuracy moves
# by 0.8 points per flipped sample of 128).
BF16_REL, BF16_ACC_POINTS = 0.01, 3.0


@pytest.mark.parametrize("method", METHODS)
def test_bf16_channels_last_run_is_finite_and_close_to_fp32(short_runs, method):
    fp32_dir, *_ = short_runs[method, "fp32"]
    bf16_dir, *_ = short_runs[method, "bf16"]
    reference, fast_run = logged(fp32_dir), logged(bf16_dir)
    assert any(k.endswith(" train_loss") for k in reference)
    assert not disagreements(reference, fast_run, BF16_REL, BF16_ACC_POINTS)
    # The fast run really ran in bf16 + channels_last: its summary says so, and its losses are not the
    # fp32 run's bit for bit.
    fits = [s for s in map(json.loads, map(Path.read_text, Path(bf16_dir).rglob("summary.json"))) if "fast_paths" in s]
    assert len(fits) == (4 if method == "sskd" else 1)
    assert all(s["fast_paths"]["amp"] is True and s["fast_paths"]["channels_last"] is True for s in fits)
    assert any(fast_run[k] != v for k, v in reference.items() if k.endswith(" train_loss"))


# What autocast must produce: the networks' logits in bf16 (so it was on), and every loss, term, feature
# distance and compact-space quantity in float32.
EXPECTED_BF16_DTYPES = {
    "alone": {"student logits": torch.bfloat16},
    "blockwise_kd": {"student logits": torch.bfloat16, "stepping-stone logits": torch.bfloat16,
                     "kd_loss": torch.float32, "blockkd_loss": torch.float32},
    "sskd": {"adapter output": torch.bfloat16, "feature_distances": torch.float32,
             "student logits": torch.bfloat16},
    "lfcc": {"student logits": torch.bfloat16, "projector output": torch.float32,
             "compact-space embeddings": torch.float32, "info_nce": torch.float32,
             "alignment losses": torch.float32},
}


@pytest.mark.parametrize("method", METHODS)
def test_dtypes_and_memory_format_under_bf16_and_channels_last(short_runs, method):
    _, student, helpers, rec = short_runs[method, "bf16"]
    assert {name: rec.dtypes[name] for name in EXPECTED_BF16_DTYPES[method]} == \
        {name: {dtype} for name, dtype in EXPECTED_BF16_DTYPES[method].items()}
    # Parameters and buffers (BatchNorm running statistics included) of everything that trained stay
    # float32, and the running statistics did move: the steps ran in train mode under autocast.
    for module in [student, *[m for ms in helpers.values() for m in ms]]:
        float32_state(module)
    batch_norms = [m for ms in helpers.values() for mod in ms for m in mod.modules() if isinstance(m, nn.BatchNorm2d)]
    if method != "lfcc":  # the Mixer and the compact space have no BatchNorm
        batch_norms += [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
        assert batch_norms and all(m.running_mean.abs().sum() > 0 and m.running_var.dtype == torch.float32
                                   for m in batch_norms)
    if method == "blockwise_kd":
        assert len(helpers["stepping-stones"]) == 1 and len(helpers["stepping-stones"][0].connectors) == 3
    # fit put the student in channels_last (1x1 connector/adapter kernels look the same in both layouts).
    assert first_spatial_conv(student).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("method", METHODS)
def test_fp32_run_has_no_bf16_and_keeps_the_default_layout(short_runs, method):
    _, student, helpers, rec = short_runs[method, "fp32"]
    assert set(EXPECTED_BF16_DTYPES[method]) <= set(rec.dtypes)  # the same places were recorded
    assert all(dtypes == {torch.float32} for dtypes in rec.dtypes.values()), dict(rec.dtypes)
    weight = first_spatial_conv(student)
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)


def test_losses_are_float32_under_autocast_by_hand():
    """The same guarantees outside fit: a bf16-autocast forward of a channels_last student and its
    stepping-stones gives bf16 logits, the Block-KD and SSKD losses come out in float32."""
    teacher, student = build_teacher("blockwise_kd", True), models.create_model("resnet8", 10)
    student.to(memory_format=torch.channels_last)
    stones = bkd.SteppingStones(teacher, student, [1, 2, 3]).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, logits = models.stage_features(student, x)
        stone_logits = stones.all_logits(features)
        teacher_logits = teacher(x)
        assert logits.dtype == torch.bfloat16 and teacher_logits.dtype == torch.bfloat16
        assert {z.dtype for z in stone_logits.values()} == {torch.bfloat16}
        assert bkd.kd_loss(logits, teacher_logits, 4.0).dtype == torch.float32
        loss, terms = bkd.blockkd_loss(logits, teacher_logits, stone_logits, y, num_stages=3, ramp=0.5)
        assert loss.dtype == torch.float32 and {t.dtype for t in terms.values()} == {torch.float32}
        narrow = build_teacher("sskd", True)
        adapters = {k: sskd.make_adapter(s, t) for k, (s, t) in
                    enumerate(zip(models.feature_shapes(student), models.feature_shapes(narrow)))}
        distances = sskd.feature_distances(student, narrow, adapters, x, [0, 1, 2])
        assert [d.dtype for d in distances] == [torch.float32] * 3
    # Under autocast the losses are those of the bf16 logits computed in float32: close to the fp32 loss.
    fp32_loss, _ = bkd.blockkd_loss(*(t.float() for t in (logits, teacher_logits)),
                                    {i: z.float() for i, z in stone_logits.items()}, y, num_stages=3, ramp=0.5)
    assert loss.item() == pytest.approx(fp32_loss.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------- compile

@pytest.fixture
def dynamo_only(monkeypatch):
    """torch.compile with the aot_eager backend: dynamo's capture and AOTAutograd's forward + backward
    graphs, which is where our code meets the compiler (graph breaks, recompiles, guards on `progress`),
    without inductor's C++ code generation (about 40 s per graph on CI's CPU). Inductor itself runs in the
    `alone` case of test_compiled_run_logs_what_the_eager_run_logs (test_gpu_check.py's compile part takes
    aot_eager too, through gpu_check.py's --compile-backend)."""
    compile_with_inductor = torch.compile

    def compile_with_aot_eager(fn, **kwargs):
        return compile_with_inductor(fn, backend="aot_eager", **kwargs)
    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)


@pytest.mark.slow
def test_compiled_step_sees_every_progress_value(dynamo_only):
    """The --compile bug: Block-KD's warm-up min(1.0, progress / r) was frozen at the second step's value
    inside the compiled step (ramp 0.54 / 0.6 logged instead of 0.86 / 1). The compiled step must return
    what the eager step returns for every progress, and compile once for all of them."""
    ramp_epochs = 0.1667  # 20/240 of 2 epochs, the default ramp of the reproduction

    def run(mode):
        torch.manual_seed(0)
        weight = nn.Parameter(torch.randn(4))

        def loss_fn(x, y, progress):
            ramp = min(1.0, progress / ramp_epochs)
            out = weight * x
            loss = F.cross_entropy(out[None], y) + ramp * out.square().mean()
            return loss, {"ramp": torch.as_tensor(ramp, dtype=torch.float32), "out": out.sum().detach()}

        fast_paths = make_args("--amp", "off", *(("--compile", mode) if mode else ()))
        step = common.make_train_step(loss_fn, torch.optim.SGD([weight], lr=0.1), [weight],
                                      {"grad_clip": 0.0}, common.fast_paths(fast_paths, CPU), CPU)
        x, y = torch.linspace(-1, 1, 4), torch.tensor([2])
        results = []
        for progress in (0.0, 0.1, 0.2, 0.5, 1.0):
            loss, terms = step(x, y, progress, 0.1)
            results.append((loss.item(), terms["ramp"].item(), terms["out"].item()))
        return results, weight.detach().clone()

    eager, eager_weight = run(None)
    assert [r[1] for r in eager] == pytest.approx([0.0, 0.1 / ramp_epochs, 1.0, 1.0, 1.0])
    torch._dynamo.reset()
    counters.clear()
    compiled, compiled_weight = run("default")
    assert counters["stats"]["unique_graphs"] == 1  # it did compile, and progress changes did not recompile
    # Measured: equal up to float32 rounding (largest difference 1.2e-7 on values of order 1).
    for (loss_e, ramp_e, out_e), (loss_c, ramp_c, out_c) in zip(eager, compiled):
        assert ramp_c == pytest.approx(ramp_e, abs=1e-6)
        assert loss_c == pytest.approx(loss_e, rel=1e-5) and out_c == pytest.approx(out_e, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(compiled_weight, eager_weight, rtol=1e-5, atol=1e-6)


# 2 epochs of 10 steps on small_data's 640 images (SSKD: 2 per phase), batch 64, fp32 and NCHW so that only
# compilation differs, evaluated on 100 test images (evaluation is eager in both runs). For Block-KD this is the
# reproduction of the bug: teacher resnet8, student resnet8, --epochs 2, the default ramp (20/240 of 2 epochs =
# 0.1667), so the mean ramp of the epochs must be 0.86 and 1.
COMPILE_RUN = {"alone": ("--epochs", 2), "blockwise_kd": ("--epochs", 2), "sskd": ("--epochs", 8),
               "lfcc": ("--epochs", 2)}
COMPILE_TEST_IMAGES = 100

# Compiled against eager, measured on the CPU (torch 2.14, 20 steps): training losses and terms differ by
# at most 4.0e-4 relative (Block-KD's cross term; aot_eager runs SSKD's and LFCC's steps to the same bits),
# accuracies by at most 2 of 500 test images (none of 100). Tolerances: 2e-3 relative (5x), 5 points (5 of
# the 100 test images) for accuracies. The bug it guards against moved the ramp by 37 % and everything weighted
# by it.
COMPILE_REL, COMPILE_ACC_POINTS = 2e-3, 5.0


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_compiled_run_logs_what_the_eager_run_logs(method, small_data, tmp_path, request):
    if method != "alone":  # the methods' own code is traced by dynamo; inductor once, for the classifier
        request.getfixturevalue("dynamo_only")
    flags = (*COMPILE_RUN[method], "--batch-size", 64, *FP32)
    data = data_slice(small_data, 640, COMPILE_TEST_IMAGES)
    train(method, data, tmp_path / "eager", *flags, record_dtypes=False)
    torch._dynamo.reset()  # a fresh compile cache: earlier tests' graphs count towards dynamo's recompile limit
    counters.clear()
    train(method, data, tmp_path / "compiled", *flags, "--compile", record_dtypes=False)
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    eager, compiled = logged(tmp_path / "eager"), logged(tmp_path / "compiled")
    assert not disagreements(eager, compiled, COMPILE_REL, COMPILE_ACC_POINTS)
    summaries = map(json.loads, map(Path.read_text, (tmp_path / "compiled").rglob("summary.json")))
    fits = [s for s in summaries if "fast_paths" in s]
    assert fits and all(s["fast_paths"]["compile"] == "default" for s in fits)
    if method == "blockwise_kd":
        for values in (eager, compiled):
            assert [values[f". epoch {e} ramp"] for e in (1, 2)] == pytest.approx([0.86, 1.0], abs=1e-6)


@pytest.mark.slow
def test_every_compiled_train_step_of_a_process_compiles(dynamo_only):
    """Every make_train_step shares one code object, and dynamo keeps at most 8 graphs per code object, then
    runs eager without an error: SSKD's teacher fit and four phases, two batch sizes each, passed that and
    its head phase ran eager. Ten train steps in a row, each with another shape, must each compile."""
    fast_paths = common.fast_paths(make_args("--amp", "off", "--no-channels-last", "--compile"), CPU)
    for size in range(2, 12):
        weight = nn.Parameter(torch.ones(size))

        def loss_fn(x, y, progress):
            return (weight * x).sin().sum() * progress, {}
        step = common.make_train_step(loss_fn, torch.optim.SGD([weight], lr=0.1), [weight], {"grad_clip": 0.0},
                                      fast_paths, CPU)
        before = counters["stats"]["unique_graphs"]
        step(torch.ones(size), None, 0.5, 0.1)
        assert counters["stats"]["unique_graphs"] == before + 1, f"train step {size - 1} ran without compiling"

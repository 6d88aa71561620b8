"""README "Copying a method into your code": its three code blocks run as they are, so that they cannot rot.

README "Copying a method into your code": its three code blocks, run as they are, so that they cannot rot.

Each block is the indented code block after a line `<!-- copy-example: NAME ...-->`. They run in order in one
namespace (the LFCC and SSKD blocks use the models of the Block-KD block). torch.optim.SGD and torchvision's
resnet18 are wrapped to record what each optimizer was given and the teacher's initial weights."""
import copy
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
import torchvision

import blockwise_kd
import lfcc
import models
from conftest import ROOT

TEACHER_SHAPES = [(128, 4, 4), (256, 2, 2), (512, 1, 1)]  # as the README says
STUDENT_SHAPES = [(32, 16, 16), (64, 8, 8), (128, 4, 4)]


def readme_block(name):
    """The indented code block that follows the marker line of `name` in README.md, dedented."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    markers = [i for i, line in enumerate(lines) if line.startswith(f"<!-- copy-example: {name} ")]
    assert len(markers) == 1, f"README.md needs exactly one '<!-- copy-example: {name} ...' line, has {len(markers)}"
    i = markers[0] + 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    block = []
    while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
        block.append(lines[i])
        i += 1
    code = textwrap.dedent("\n".join(block)).strip("\n")
    assert code.count("\n") >= 5, f"no code block after the {name} marker"
    return code


def run_block(name, namespace):
    exec(compile(readme_block(name), f"README.md <copy-example: {name}>", "exec"), namespace)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(before, module):
    after = module.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"changed: {changed}"


def changed_keys(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def same_params(params, expected):
    return {id(p) for p in params} == {id(p) for p in expected} and len(params) == len(list(expected))


@pytest.fixture
def recorded(monkeypatch):
    """Runs of torch.optim.SGD and torchvision.models.resnet18 while the README blocks execute."""
    record = {"optimizers": [], "resnet18": []}
    namespace = {"__name__": "readme_example"}
    original_sgd, original_resnet18 = torch.optim.SGD, torchvision.models.resnet18

    class RecordingSGD(original_sgd):
        def __init__(self, params, *args, **kwargs):
            params = list(params)
            student = namespace["student"]
            record["optimizers"].append({
                "params": params,
                "before": [p.detach().clone() for p in params],
                "student_state": state(student),
                "modes": {name: [m.training for m in child.modules()] for name, child in student.named_children()},
                "trainable": {id(p) for p in student.parameters() if p.requires_grad}})
            super().__init__(params, *args, **kwargs)

    def recording_resnet18(*args, **kwargs):
        net = original_resnet18(*args, **kwargs)
        record["resnet18"].append((kwargs, state(net)))
        return net

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    monkeypatch.setattr(torchvision.models, "resnet18", recording_resnet18)
    return record, namespace


def test_readme_copy_example_trains_each_method_and_leaves_the_teacher_unchanged(recorded):
    record, ns = recorded
    torch.manual_seed(0)

    # ---- Block-KD: one step
    run_block("blockkd", ns)
    teacher, student, stones, x = ns["teacher"], ns["student"], ns["stones"], ns["x"]
    [(kwargs, teacher_at_start)] = record["resnet18"]
    assert kwargs.get("weights", "missing") is None and kwargs["num_classes"] == 10  # no download
    assert_same_state({"net." + k: v for k, v in teacher_at_start.items()}, teacher)  # BN buffers included
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    # The wrapper's decomposition is the model, and the shapes are the README's.
    features, logits = models.stage_features(teacher, x)
    assert torch.equal(logits, teacher(x))
    assert models.feature_shapes(teacher) == TEACHER_SHAPES
    assert models.feature_shapes(student) == STUDENT_SHAPES
    assert sorted(ns["stone_logits"]) == [1, 2, 3]
    assert all(z.shape == (8, 10) for z in ns["stone_logits"].values())
    assert ns["student_logits"].shape == (8, 10)
    assert ns["loss"].dim() == 0 and math.isfinite(ns["loss"].item()) and ns["loss"].item() > 0
    assert ns["terms"]["ramp"].item() == pytest.approx(0.1)
    assert ns["terms"]["distill"].item() > 0 and ns["terms"]["cross"].item() > 0
    [blockkd_opt] = record["optimizers"]
    assert same_params(blockkd_opt["params"], [*student.parameters(), *stones.parameters()])
    assert len(list(stones.parameters())) == 3 * 3  # Conv1x1 (no bias) + BatchNorm per connector, not the teacher's
    for stone in "123":  # every connector: gradient through the frozen teacher, and a step
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stones.connectors[stone].parameters())
    stage1 = list(student.stages()[0].parameters())
    assert stage1 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage1)
    before = {id(p): b for p, b in zip(blockkd_opt["params"], blockkd_opt["before"])}
    assert all(not torch.equal(p, before[id(p)]) for p in stage1)
    assert all(not torch.equal(p, before[id(p)]) for p in stones.parameters())

    # ---- LFCC: one step with the same models
    run_block("lfcc", ns)
    space = ns["space"]
    assert [m.in_features for m in space.student] == [21 * s[0] for s in STUDENT_SHAPES]
    # ResNet-18's layer4 (512 channels) is wider than reduce_channels=256: a 1x1 conv brings it to 256 first.
    assert [m.in_features for m in space.teacher] == [21 * min(s[0], 256) for s in TEACHER_SHAPES]
    assert [type(r).__name__ for r in space.teacher_reduce] == ["Identity", "Identity", "ChannelReduction"]
    assert len(ns["per_stage"]) == 3 and all(math.isfinite(loss.item()) for loss, _ in ns["per_stage"])
    # The loss the README gives as the script's: CE + 1 * KD (T = 4) + 1 * mean of the stage losses.
    student_logits, teacher_logits = ns["student_logits"], ns["teacher_logits"]
    expected = (F.cross_entropy(student_logits, ns["y"]) + lfcc.kd_loss(student_logits, teacher_logits, 4.0)
                + torch.stack([loss for loss, _ in ns["per_stage"]]).mean())
    torch.testing.assert_close(ns["loss"], expected)
    assert math.isfinite(ns["loss"].item())
    lfcc_opt = record["optimizers"][1]
    assert same_params(lfcc_opt["params"], [*student.parameters(), *space.parameters()])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in space.parameters())
    before = {id(p): b for p, b in zip(lfcc_opt["params"], lfcc_opt["before"])}
    assert all(not torch.equal(p, before[id(p)]) for p in student.stages()[0].parameters())
    assert_same_state({"net." + k: v for k, v in teacher_at_start.items()}, teacher)

    # ---- SSKD: three stage phases and the head phase, one step each
    run_block("sskd", ns)
    phases = record["optimizers"][2:]
    assert len(phases) == 4
    names = {id(m): n for n, m in student.named_children()}
    stage_names = [names[id(stage)] for stage in student.stages()]  # s1, s2, s3
    head_names = {names[id(m)] for m in student.head().children() if id(m) in names}  # fc
    assert head_names == {"fc"}

    def keys_of(child_names):
        return {k for k in student.state_dict() if k.split(".")[0] in child_names}

    final = state(student)
    for k, phase in enumerate(phases):
        trained = {stage_names[k]} if k < 3 else head_names
        own = [p for n, p in student.named_parameters() if n.split(".")[0] in trained]
        # The optimizer holds exactly this phase's parameters (and the adapter's), only they require grad.
        assert {id(p) for p in own} <= {id(p) for p in phase["params"]}
        assert phase["trainable"] == {id(p) for p in own}
        assert not {id(p) for p in phase["params"]} & {id(p) for n, p in student.named_parameters()
                                                      if n.split(".")[0] not in trained}
        # Modes: the trained part in train mode, every other part of the student in eval mode.
        for name, modes in phase["modes"].items():
            assert all(modes) if name in trained else not any(modes), (k, name, modes)
        # What changed during the phase (params and BatchNorm buffers): its own part only, and all of it.
        after = phases[k + 1]["student_state"] if k < 3 else final
        changed = changed_keys(phase["student_state"], after)
        if k == 2:  # between the last stage step and the head phase, reset_head re-initialises the head
            assert changed & keys_of(head_names) == {"fc.weight", "fc.bias"}
            changed -= keys_of(head_names)
        assert changed and changed <= keys_of(trained), (k, changed)
        assert {key for key in keys_of(trained) if "weight" in key or "bias" in key} <= changed
    adapters = [p for p in phases[0]["params"] if all(p is not q for q in student.parameters())]
    assert len(adapters) == 3  # stage 1: 32x16x16 -> 128x4x4 needs Conv1x1 (no bias) + BatchNorm
    assert all(p.requires_grad for p in student.parameters())
    assert_same_state({"net." + k: v for k, v in teacher_at_start.items()}, teacher)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.fixture(scope="module")
def readme_models():
    """The teacher and student as the README's Block-KD block leaves them (frozen teacher, one step done)."""
    ns = {"__name__": "readme_example"}
    torch.manual_seed(0)
    run_block("blockkd", ns)
    return ns["teacher"], ns["student"]


@pytest.mark.parametrize("unfreeze", ["train mode", "one BatchNorm in train mode", "requires grad"])
def test_an_unfrozen_teacher_is_refused(readme_models, unfreeze):
    teacher, student = copy.deepcopy(readme_models[0]), readme_models[1]
    low_pass = lambda feature_map: lfcc.multiscale_low_pass(feature_map, (1, 2, 4))  # noqa: E731

    # As the README leaves it, the teacher is frozen: both build.
    blockwise_kd.SteppingStones(teacher, student, [1, 2, 3])
    lfcc.make_compact_space(student, teacher, (1, 2, 3), low_pass, 16)

    if unfreeze == "train mode":
        teacher.train()
    elif unfreeze == "one BatchNorm in train mode":
        teacher.net.layer3[0].bn1.train()
    else:
        teacher.net.fc.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="the teacher must be frozen"):
        blockwise_kd.SteppingStones(teacher, student, [1, 2, 3])
    with pytest.raises(ValueError, match="the teacher must be frozen"):
        lfcc.make_compact_space(student, teacher, (1, 2, 3), low_pass, 16)

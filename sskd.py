"""Stage-by-stage knowledge distillation (SSKD): first copy the teacher's features stage by stage, then
train the task head on labels alone.

Where to look: the loss is `feature_distances` (phase A) and `make_head_loss_fn` (phase B); the phases are
`train_backbone` and `train_head`, run in order by `distill`; each phase's step and loop are
`common.make_train_step` and `common.fit`.

Paper: Mengya Gao, Yujun Shen, Quanquan Li, Junjie Yan, Liang Wan, Dahua Lin, Chen Change Loy, Xiaoou Tang,
"Feature Matters: A Stage-by-Stage Approach for Knowledge Transfer", arXiv:1812.01819 (2018); v2 (2019) is
"An Embarrassingly Simple Approach for Knowledge Distillation". (Not "Knowledge Distillation Meets
Self-Supervision", also abbreviated SSKD.) No code is public: the two-phase structure, the frozen backbone
in phase B and features mimicked "without any processing" are from the abstracts and the paper's pipeline
figure **[paper]**; one stage at a time with the earlier stages frozen and an L2 loss is from a public
summary of v2 **[summary]**; epochs, learning rates and the loss scale could not be read from the paper and
are this file's decisions **[choice]**, each a flag.

    python sskd.py --teacher resnet32x4 --student resnet8x4          # CIFAR-100, 240 epochs in 4 phases

Idea **[paper]**: plain KD trains on task loss + KD loss with a hand-tuned weight between them. SSKD has no
such weight because it never mixes the two:

Phase A, backbone transfer, for k = 1..K (K stages, 3 in the CIFAR zoo; the stem is in stage 1; the code
counts from 0), one `fit` per stage:

    z   = S_{k-1}(... S_1(x))     the student's own stages before k: frozen, eval mode, no grad  (z)
    t_k = T_k(... T_1(x))         the teacher's stage-k output: frozen, eval mode, no grad       (targets[k])
    L_k = w * mean((A_k(S_k(z)) - t_k)^2) / E_k     w = --feat-weight, mean over all elements (feature_distances)
    E_k = mean(t_k^2) over one pass of the training data before phase A: a constant   (teacher_energies)

    S_k is trained alone **[summary]**; stages > k and the head are not used. The input is the student's
    own output, not the teacher's **[choice, implied by "progressive"]** (`--teacher-input` for the other).
    A_k (`adapters[k]`) is the identity when the shapes match (resnet32x4 -> resnet8x4 at every stage);
    otherwise Conv1x1 + BatchNorm, with a resize and a token<->map reshape where the feature forms differ
    (into a class-token teacher, ViT or DeiT, the adapted feature is compared with its patch tokens)
    **[choice]**. It exists for the loss only: stage k+1 receives S_k's native output, and the adapter is
    dropped after its phase, so the saved student has exactly the zoo's state_dict keys. No labels.

Phase B, task head **[paper]**: the whole backbone is frozen (eval mode, no grad), the head is
re-initialised (its Linear, and its norm where it has one: WRN's final BN, the token models' LayerNorm) and
trained with cross-entropy on the labels alone: L = CE(head(z_K), y). No teacher, no KD term.

Schedule **[choice]**: budget matched to a 240-epoch run. Of `--epochs` E, the head phase gets a tenth
(E // 10, at least 1) and the K stage phases share the rest equally ((E - head) // K, at least 1; a
remainder is not trained): 72 + 72 + 72 + 24 for E = 240, 6 + 6 + 6 + 2 for E = 20; `--stage-epochs` /
`--head-epochs` override. Why (the budget study, benchmarks/README.md): accuracy follows the stage-3 copy,
which improves with every stage epoch, while the head on a frozen backbone needs few epochs.
Every phase is one `common.fit` with its own optimizer over that phase's trainable parameters only (weight
decay touches nothing else) and the student family's recipe scaled to the phase (cnn: SGD lr 0.05,
momentum 0.9, wd 5e-4, batch 64, x0.1 at 62.5/75/87.5 % of the phase; a `--milestones` given on the command
line applies to every phase as it is). Its outputs go to out_dir/stage1, stage2, stage3, head;
out_dir/summary.json gathers them and out_dir/model.pth is the final student.

Loss scale `--feat-weight` w **[choice]**: phase A has one term, so w only scales its gradient against
weight decay and the learning rate (with SGD; AdamW, the token recipe, is nearly scale-free). Default
w = 10, best or close to it in two short runs against 1 and 100 (benchmarks/README.md); w = 100, the FitNet
hint weight (there balanced against CE), takes steps too large for a lone loss.

Feature scale `--feat-norm` E_k **[choice]**: with the plain MSE (`--feat-norm none`, E_k = 1) the SGD step
grows with the square of the teacher's feature scale; a torchvision ResNet's stage outputs are far larger
than the CIFAR zoo's, and its stage-3 phase diverged. The default divides each stage's MSE by the teacher's
mean squared stage output E_k, measured once (so the target t_k is still the raw feature, "without any
processing") and logged: the loss is then the same for a teacher whose features are c times larger. The
measurements that chose it are in benchmarks/README.md ("SSKD and the teacher's feature scale").

Ablations **[choice]**, each one branch: `--joint` (one phase trains the whole backbone on the sum of all
stage losses, K x the stage epochs), `--teacher-input` (stage k is fed the teacher's feature k-1; only
where those shapes match), `--finetune-all` (phase B trains the whole student, not only the head).

Resume: with `--resume`, every phase continues through `fit`'s own resume, which refuses a checkpoint of
another run (its flags, data and teacher are recorded in it); a finished phase trains no epoch and loads the
student it ended with.
"""
import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import models


# ------------------------------------------------------------------------------------------- adapters

class Adapter(nn.Module):
    """Student stage output -> the teacher's stage-output shape, for the loss only: tokens become a map,
    Conv1x1 + BatchNorm to the teacher's channels, resize to the teacher's grid, back to tokens if the
    teacher has tokens. Shapes are per sample: (C, H, W) for maps, (N, D) for tokens."""

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        self.teacher_tokens = len(teacher_shape) == 2
        student_channels, _ = models.grid_shape(student_shape)
        teacher_channels, self.side = models.grid_shape(teacher_shape)
        self.conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(teacher_channels)

    def forward(self, x):
        x = models.resize_map(self.bn(self.conv(models.to_map(x))), self.side)
        return models.to_tokens(x) if self.teacher_tokens else x


def make_adapter(student_shape, teacher_shape):
    """The identity exactly when the shapes match: features are then compared "without any processing"."""
    if tuple(student_shape) == tuple(teacher_shape):
        return nn.Identity()
    return Adapter(student_shape, teacher_shape)


def check_teacher_input(student, teacher, image_size=32):
    """--teacher-input feeds student stage k the teacher's feature k-1, so those shapes must agree."""
    student_shapes = models.feature_shapes(student, image_size)
    teacher_shapes = models.feature_shapes(teacher, image_size)
    for k, (s, t) in enumerate(zip(student_shapes[:-1], teacher_shapes[:-1]), start=1):
        if tuple(s) != tuple(t):
            raise SystemExit(f"error: --teacher-input needs equal stage outputs, but after stage {k} the "
                             f"teacher {teacher.arch} gives {tuple(t)} and the student {student.arch} "
                             f"{tuple(s)}; drop --teacher-input for this pair")


# ------------------------------------------------------------------------------------------- the loss

def feature_distances(student, teacher, adapters, x, trained, teacher_input=False):
    """Mean squared errors between A_k(S_k(input_k)) and the teacher's stage-k output, for each 0-based
    stage index k in `trained` (in order). Stages before the first trained one run without gradients;
    their output is the input of the next stage (or the teacher's feature with `teacher_input`)."""
    last = max(trained)
    with torch.no_grad():
        targets, t = [], x
        for stage in teacher.stages()[:last + 1]:
            t = stage(t)
            targets.append(t)
    first, distances, z = min(trained), [], x
    for k, stage in enumerate(student.stages()[:last + 1]):
        if teacher_input and k < first:
            continue  # its output would be replaced by the teacher's feature anyway
        if teacher_input and k > 0:
            z = targets[k - 1]
        with torch.set_grad_enabled(torch.is_grad_enabled() and k >= first):
            z = stage(z)
        if k in trained:
            adapted, target = adapters[k](z), targets[k]
            if adapted.shape[1:] != target.shape[1:] and models.has_class_token(target.shape[1:]):
                target = target[:, 1:]  # an adapted feature matches a class-token teacher's patches [choice]
            distances.append(F.mse_loss(adapted.float(), target.float()))  # float32: fit may run in bf16
    return distances


# ------------------------------------------------------------------------------------- training glue

def metric_names(trained):
    """Names of the logged feature MSEs: 'feat_mse' for a stage phase, one per stage with --joint."""
    return ["feat_mse"] if len(trained) == 1 else [f"feat_mse_stage{k + 1}" for k in trained]


def set_trainable(student, modules):
    """requires_grad only for the parameters of `modules`: the phase's optimizer gets nothing else."""
    for p in student.parameters():
        p.requires_grad_(False)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)


def make_backbone_loss_fn(student, teacher, adapters, trained, feat_weight, teacher_input=False, energies=None):
    """Phase A's loss_fn(x, y, progress): feat_weight x the sum of the trained stages' feature MSEs, each
    divided by its stage's constant in `energies` (0-based stage -> the teacher's mean squared output,
    `teacher_energies`; None: divided by nothing, --feat-norm none). The raw MSEs are logged."""
    names = metric_names(trained)
    scales = [1.0 if energies is None else 1.0 / energies[k] for k in trained]

    def loss_fn(x, y, progress):
        distances = feature_distances(student, teacher, adapters, x, trained, teacher_input)
        loss = feat_weight * sum(d * scale for d, scale in zip(distances, scales))
        return loss, {"train_" + n: d for n, d in zip(names, distances)}
    return loss_fn


def loss_target_drops_class_token(student_shape, teacher_shape):
    """Whether the loss compares an adapted feature with the teacher's patch tokens only (feature_distances:
    the shapes differ and the teacher's tokens hold a class token)."""
    return tuple(student_shape) != tuple(teacher_shape) and models.has_class_token(tuple(teacher_shape))


@torch.no_grad()
def teacher_energies(teacher, data, stages, shapes, args):
    """{0-based stage k: mean(t_k^2)} for k in `stages`: the teacher's mean squared stage-k output (the
    target of the loss, patch tokens only where feature_distances compares those) over one pass of the
    training set, augmented as in epoch 0 of a run with this seed, in the run's precision. Measured once
    before phase A; a constant, so the target stays the raw feature. Under torchrun each rank measures its
    part of the pass and the sums are added up."""
    fast = common.fast_paths(args, data.device)
    last = max(stages)
    sums = {k: torch.zeros((), device=data.device) for k in stages}
    count = torch.zeros((), device=data.device)
    teacher_stages = teacher.stages()[:last + 1]
    batches = data.train_batches(256, args.seed, 0, fast.channels_last,  # epoch 0's images, in batches
                                 (common.rank(), common.world_size()))  # of any size
    with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=fast.amp):
        for x, _ in batches:
            t = x
            for k, stage in enumerate(teacher_stages):
                t = stage(t)
                if k in sums:
                    target = t[:, 1:] if loss_target_drops_class_token(*shapes[k]) else t
                    sums[k] += target.float().pow(2).mean() * len(x)
            count += len(x)
    totals = common.sum_across_ranks({**{str(k): v for k, v in sums.items()}, "n": count})
    n = totals.pop("n").item()
    return {int(k): v.item() / n for k, v in totals.items()}


def make_head_loss_fn(student, finetune_all, label_smoothing):
    """Phase B's loss_fn(x, y, progress): the backbone (without gradients unless finetune_all), then the
    head, cross-entropy on the labels."""
    stages, head = student.stages(), student.head()

    def loss_fn(x, y, progress):
        with torch.set_grad_enabled(finetune_all):
            for stage in stages:
                x = stage(x)
        return F.cross_entropy(head(x), y, label_smoothing=label_smoothing), {}
    return loss_fn


def stage_shapes(student, teacher, image_size):
    """[(the student's, the teacher's) stage-k output shape per sample] for every stage k."""
    return list(zip(models.feature_shapes(student, image_size), models.feature_shapes(teacher, image_size)))


def train_backbone(args, data, student, teacher, trained, epochs, out_dir, energies=None):
    """Phase A for the 0-based stages in `trained`: [k] for stage k alone, all of them with --joint.
    `energies`: the teacher's per-stage mean squared outputs for --feat-norm teacher-energy (measured here
    when not given). Returns fit's summary; the adapters are local to this call and are dropped with it."""
    device = data.device
    stages = student.stages()
    shapes = stage_shapes(student, teacher, data.image_size)
    adapters = {k: make_adapter(*shapes[k]).to(device) for k in trained}
    train_modules = [stages[k] for k in trained] + [adapters[k] for k in trained]
    set_trainable(student, train_modules)

    names = metric_names(trained)
    if args.feat_norm == "teacher-energy" and energies is None:
        energies = teacher_energies(teacher, data, trained, shapes, args)
    loss_fn = make_backbone_loss_fn(student, teacher, adapters, trained, args.feat_weight, args.teacher_input,
                                    energies if args.feat_norm == "teacher-energy" else None)

    def eval_fn(x, y):  # the unweighted test feature MSE, student (adapted) vs teacher
        return dict(zip(names, feature_distances(student, teacher, adapters, x, trained, args.teacher_input)))

    recipe = common.make_recipe(args, models.model_family(student.arch), epochs=epochs,
                                model_name=student.arch)
    name = "all stages jointly" if len(trained) > 1 else f"stage {trained[0] + 1}/{len(stages)}"
    adapted = [k + 1 for k in trained if not isinstance(adapters[k], nn.Identity)]
    common.log(f"SSKD phase A, {name}: {student.arch} <- {teacher.arch}, "
               f"adapters at stages {adapted or 'none (shapes match)'}")
    return common.fit(student, data, out_dir, recipe, loss_fn=loss_fn, train_modules=train_modules,
                      eval_fn=eval_fn, title=f"SSKD {name}", **common.run_options(args, teacher))


def reset_head(student):
    """Re-initialise the head's Linear and norm (BatchNorm's running statistics included)."""
    for module in student.head().modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def train_head(args, data, student, epochs, out_dir, teacher=None):
    """Phase B: the frozen backbone's features, a re-initialised head, cross-entropy on labels only
    (`teacher`, not used, is the run's: recorded in the phase's checkpoint and summary)."""
    reset_head(student)
    train_modules = [student] if args.finetune_all else [student.head()]
    set_trainable(student, train_modules)
    recipe = common.make_recipe(args, models.model_family(student.arch), epochs=epochs,
                                model_name=student.arch)
    loss_fn = make_head_loss_fn(student, args.finetune_all, recipe["label_smoothing"])

    common.log(f"SSKD phase B: {'the whole student' if args.finetune_all else 'the head'} of "
               f"{student.arch}, re-initialised head, cross-entropy on labels only")
    return common.fit(student, data, out_dir, recipe, loss_fn=loss_fn, train_modules=train_modules,
                      title=f"SSKD head of {student.arch}", **common.run_options(args, teacher))


def phase_plan(args, num_stages):
    """([(name, the 0-based stages it trains, epochs)] of phase A in the order they run, phase B's epochs)."""
    epochs = common.run_epochs(args)
    head_epochs = args.head_epochs or max(1, epochs // 10)
    stage_epochs = args.stage_epochs or max(1, (epochs - head_epochs) // num_stages)
    if args.joint:
        return [("joint", list(range(num_stages)), num_stages * stage_epochs)], head_epochs
    return [(f"stage{k + 1}", [k], stage_epochs) for k in range(num_stages)], head_epochs


def check_pair(args, teacher, student, image_size):
    """Stage k of the student mimics stage k of the teacher: the same number of stages, and with
    --teacher-input equal shapes (check_teacher_input)."""
    if len(student.stages()) != len(teacher.stages()):
        raise SystemExit(f"error: {student.arch} has {len(student.stages())} stages and {teacher.arch} "
                         f"{len(teacher.stages())}: SSKD's stage phases need the same number")
    if args.teacher_input:
        check_teacher_input(student, teacher, image_size)


def distill(args, data, teacher, student):
    """SSKD from the frozen `teacher` into `student`: all phases in order, resumable across them; writes
    args.out_dir/summary.json and args.out_dir/model.pth and returns the summary."""
    out_dir = Path(args.out_dir)
    check_pair(args, teacher, student, data.image_size)
    backbone_phases, head_epochs = phase_plan(args, len(student.stages()))
    plan = [(name, epochs) for name, _, epochs in backbone_phases] + [("head", head_epochs)]
    shown = ", ".join(f"{name}/ {epochs} epochs" for name, epochs in plan)
    common.log(f"SSKD: {len(plan)} phases, each its own run in a sub-folder of {out_dir}: {shown}; "
               f"{sum(epochs for _, epochs in plan)} epochs in all")
    # With --resume every phase continues through fit's own resume, which checks that its checkpoint is of
    # this run; a finished phase trains no epoch and leaves the student as the phase ended it. Adapter and
    # head initialisation depend only on (seed, phase): a resumed run equals an uninterrupted one.
    num_stages = len(student.stages())
    energies = teacher_energies(teacher, data, range(num_stages), stage_shapes(student, teacher, data.image_size),
                                args)  # deterministic: a resumed run measures the same constants
    shown = ", ".join(f"stage {k + 1} {e:.4g}" for k, e in energies.items())
    common.log(f"SSKD: the teacher's mean squared stage outputs on the training data: {shown}; the stage "
               + ("losses are divided by them (--feat-norm teacher-energy)" if args.feat_norm == "teacher-energy"
                  else "losses are not divided by them (--feat-norm none)"))
    summaries, stage_mse, stage_rel = {}, {}, {}
    for index, (name, trained, epochs) in enumerate(backbone_phases):  # phase A
        torch.manual_seed(args.seed + index)
        summaries[name] = train_backbone(args, data, student, teacher, trained, epochs, out_dir / name, energies)
        for k, key in zip(trained, metric_names(trained)):
            stage = f"stage{k + 1}"
            stage_mse[stage] = summaries[name]["last_epoch"][key]
            stage_rel[stage] = stage_mse[stage] / energies[k]
            common.log(f"SSKD stage {k + 1}: test feature MSE {stage_mse[stage]:.4g}, "
                       f"{100 * stage_rel[stage]:.3g} % of E_k (the teacher's mean squared output on the "
                       "augmented training images, not the test ones)")
    torch.manual_seed(args.seed + len(backbone_phases))  # phase B
    summaries["head"] = train_head(args, data, student, head_epochs, out_dir / "head", teacher)
    for p in student.parameters():
        p.requires_grad_(True)

    head = summaries["head"]
    total_epochs = sum(s["epochs"] for s in summaries.values())
    summary = {"method": "sskd", "last_acc": head["last_acc"], "best_acc": head["best_acc"],
               "best_epoch": head["best_epoch"], "stage_feat_mse": stage_mse,
               "stage_feat_mse_relative": stage_rel,  # test MSE / the teacher's training-data energy
               "teacher_feature_energy": {f"stage{k + 1}": e for k, e in energies.items()},
               "epochs": total_epochs,
               "params": common.count_params(student),
               "seconds": sum(s["seconds"] for s in summaries.values()),
               "phases": {name: {k: s[k] for k in ("epochs", "seconds", "last_epoch", "recipe")}
                          for name, s in summaries.items()},
               "data": data.fingerprint, "teacher": common.teacher_record(teacher), "config": vars(args)}
    common.save_json(summary, out_dir / "summary.json")
    final_model = common.model_file(student, total_epochs, head["last_acc"], data)
    common.save_atomic(final_model, out_dir / "model.pth")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in stage_mse.items())
    common.log(f"SSKD done: test feature MSE {shown}; head accuracy last {head['last_acc']}, best "
               f"{head['best_acc']} -> {out_dir}")
    return summary


def add_args(parser):
    """SSKD's own flags; every [choice] of the method is one of them."""
    g = parser.add_argument_group("SSKD")
    g.add_argument("--stage-epochs", type=common.positive_int,
                   help="epochs of each stage phase (default: what the head phase leaves of --epochs, shared "
                        "equally, at least 1: 72 of 240, 6 of 20)")
    g.add_argument("--head-epochs", type=common.positive_int,
                   help="epochs of the head phase (default: --epochs // 10, at least 1: 24 of 240, 2 of 20)")
    g.add_argument("--feat-weight", type=common.positive_float, default=10.0,
                   help="phase A loss = weight x mean squared feature error, divided as --feat-norm says "
                        "(default 10; see the docstring)")
    g.add_argument("--feat-norm", choices=["teacher-energy", "none"], default="teacher-energy",
                   help="teacher-energy (default): each stage's MSE divided by the teacher's mean squared "
                        "stage output on the training data, measured once before phase A, so that the loss "
                        "does not depend on the teacher's feature scale; none: the plain MSE")
    g.add_argument("--joint", action="store_true",
                   help="ablation: train the whole backbone at once on the sum of all stage losses "
                        "(stages x stage epochs), then the head")
    g.add_argument("--teacher-input", action="store_true",
                   help="ablation: feed stage k the teacher's feature k-1 instead of the student's own "
                        "(only where the student's and teacher's stage outputs have the same shapes)")
    g.add_argument("--finetune-all", action="store_true",
                   help="ablation: phase B trains the whole student (head re-initialised), not only the head")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Stage-by-stage knowledge distillation (SSKD): the "
                                     "student's backbone copies the teacher's features one stage at a time, "
                                     "then its head is trained on labels alone.")
    common.add_common_args(parser)
    common.add_distill_args(parser)
    add_args(parser)
    args = parser.parse_args(argv)
    teacher, student, image_size = common.meta_pair(args)  # the pair's shapes, before anything is trained
    check_pair(args, teacher, student, image_size)
    for shapes in zip(models.feature_shapes(student, image_size), models.feature_shapes(teacher, image_size)):
        make_adapter(*shapes)  # an adapter for every stage whose shapes differ
    device, data = common.setup(args, "sskd", parser)
    teacher = common.load_teacher(args, data)
    torch.manual_seed(args.seed)
    student = common.build_model(args.student, data.num_classes, device, sync_bn=args.sync_bn)
    distill(args, data, teacher, student)


if __name__ == "__main__":
    common.run_main(main)

"""Block-wise logit distillation (Block-KD) for CIFAR, in one file.

Where to look: the loss is `blockkd_loss`, fed by `make_loss_fn` (student, teacher and stepping-stone
logits of one batch); `distill` hands it to `common.fit`, the loop, whose step is `common.make_train_step`
(forward and loss, backward, optimizer step). The stepping-stones are `SteppingStones`.

Paper: C. Yu, F. Zhang, R. Chen, A. Wang, Z. Liu, S. Tan, E.-P. Li, "Decoupling Dark Knowledge via
Block-wise Logit Distillation for Feature-level Alignment", arXiv:2411.01547, IEEE TAI 2024. No official
code is public, and the paper's hyper-parameters, connectors and tables could not be read: the
composition of the stepping-stones and the structure of the loss follow the paper's text as quoted in
public notes (**[paper]**); everything marked **[choice]** is this project's decision and is a flag, so
that a reader with the PDF can switch to the paper's value without editing code.

    python blockwise_kd.py --teacher resnet32x4 --student resnet8x4               # Block-KD, 240 epochs
    python blockwise_kd.py --teacher resnet32x4 --student resnet8x4 \\
        --stones none --gamma 0 --alpha 0.1 --beta 0.9                           # plain Hinton KD

Idea [paper]: feature alignment measured *through the teacher*. A student feature of stage i, mapped
into the teacher's feature space by a small connector C_i, goes through the frozen teacher's remaining
stages and head, and the resulting logits are distilled. With the teacher T = T_c . T_n ... T_1 and the
student S = S_c . S_n ... S_1 (n stages, 3 in the CIFAR zoo, the same for both; T_c / S_c the heads;
[choice] the stem belongs to stage 1), the stepping-stone models that gradually replace the teacher's
blocks by the student's are

    N_i = T_c . T_n ... T_{i+1} . C_i . S_i ... S_1,    i = 1..n      (`SteppingStones.forward(i, ...)`)

They exist only for training; the saved model is the plain student (connectors are not in `model.pth`).

Loss [paper], with Y^S = `student_logits`, Y^T = `teacher_logits`, Y^{N_i} = `stone_logits[i]`:

    L_task    = CE(Y^S, y)    + sum_i w_i CE(Y^{N_i}, y)                    `task_loss`
    L_distill = d(Y^T, Y^S)   + sum_i w_i d(Y^T, Y^{N_i})                   `distill_loss`
    Y^ens     = mean_i Y^{N_i}                                              `ensemble`
    L_cross   = d(Y^ens, Y^S) + sum_i w_i d(Y^ens, Y^{N_i})                 `cross_loss`
    L         = alpha L_task + r(t) (beta L_distill + gamma L_cross)

- w_i = 2^-(n-i) [paper, as quoted]; whether w_i also weighs L_cross is unknown [choice: yes,
  --no-cross-stone-weights drops it].
- d(p, q) = T^2 KL(softmax(p/T) || softmax(q/T)), batch mean [choice: the usual KD distance], T = 4
  (--kd-temperature); in the code `kd_loss(q, p, T)`, the learning side first as in Hinton KD.
- Y^ens is detached, a target and not a path for gradients [choice: --no-detach-ensemble].
- alpha = beta = gamma = 1 [choice]; r(t) a linear warm-up of the beta and gamma terms from 0 to 1 over
  the first --ramp-epochs [choice: 20 of 240 epochs, scaled with --epochs like the lr milestones, and 0,
  i.e. no warm-up, when there are no stepping-stones] because fresh connectors make early stepping-stone
  logits poor.
- All chosen stepping-stones are active in every step [choice]; --stones picks a subset (then Y^ens is the
  mean over that subset and w_i keeps its i), `--stones none` leaves only the student terms and L_cross = 0.
- Connectors C_i [choice]: resize to the teacher's grid (average pooling down, bilinear up; tokens are a
  square grid, a class token apart), then Conv1x1 + BatchNorm (+ ReLU where the teacher's stage outputs
  are post-activation) into a map, or Linear + LayerNorm into tokens (plus a learned class token for a
  teacher that has one). A connector is used even where shapes match (it recalibrates statistics);
  --identity-connector skips it there.

Which parameters learn: the student and the connectors. The teacher is frozen and stays in eval mode
(hybrid features must not move its BatchNorm statistics), but gradients flow *through* its stages into
C_i and S_1..S_i. Cost per step: one student forward, one no-grad teacher forward, and for each i the
teacher suffix with activations kept for backward -- about one extra teacher forward + backward for
n = 3; `images_per_sec` in metrics.jsonl and summary.json shows it.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import models

DEFAULT_RAMP_FRACTION = 20 / 240  # 20 warm-up epochs in the 240-epoch recipe


# ----------------------------------------------------------------------------------------- connectors

class Connector(nn.Module):
    """C_i: a student stage output -> the form, grid size and width the teacher's next stage expects.

    Either kind of input is read as a map (tokens as their sqrt(N) x sqrt(N) grid) and resized to the
    teacher's grid; into a map teacher: Conv1x1 (no bias) + BatchNorm, + ReLU when the teacher's stage
    outputs are post-activation; into a token teacher: flattened to tokens, Linear + LayerNorm, and where
    the teacher's stage outputs begin with a class token (ViT, DeiT), a learned one in front [choice: zeros
    at the start, trained with the connector]."""

    def __init__(self, student_shape, teacher_shape, teacher_kind, teacher_activation):
        super().__init__()
        student_width, _ = models.grid_shape(student_shape)
        teacher_width, self.side = models.grid_shape(teacher_shape)
        self.teacher_kind = teacher_kind
        if teacher_kind == "map":
            layers = [nn.Conv2d(student_width, teacher_width, 1, bias=False), nn.BatchNorm2d(teacher_width)]
            if teacher_activation == "relu":
                layers.append(nn.ReLU(inplace=True))
        else:
            layers = [nn.Linear(student_width, teacher_width), nn.LayerNorm(teacher_width)]
        self.project = nn.Sequential(*layers)
        self.class_token = None
        if models.has_class_token(teacher_shape):
            self.class_token = nn.Parameter(torch.zeros(1, 1, teacher_width))

    def forward(self, feature):
        x = models.resize_map(models.to_map(feature), self.side)
        if self.teacher_kind == "tokens":
            x = models.to_tokens(x)
        x = self.project(x)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(len(x), -1, -1).to(x.dtype), x], dim=1)
        return x


def check_frozen_teacher(teacher):
    """The teacher must be fixed before it is used: in eval mode (in train mode every hybrid batch would move
    its BatchNorm statistics) and without trainable parameters (an optimizer over them would change it)."""
    trainable = sum(p.requires_grad for p in teacher.parameters())
    in_train_mode = sum(m.training for m in teacher.modules())
    if trainable or in_train_mode:
        raise ValueError(f"the teacher must be frozen, but {trainable} of its parameter tensors require grad "
                         f"and {in_train_mode} of its modules are in train mode; call teacher.eval() and "
                         f"teacher.requires_grad_(False) first")


class SteppingStones(nn.Module):
    """The connectors C_i, and N_i's tail T_c . T_n ... T_{i+1} . C_i applied to a student stage-i output.

    Only the connectors are submodules: the teacher's stages and head are kept in a plain tuple, so they
    are neither optimised, nor saved with the connectors, nor switched to train mode by `.train()`. The
    teacher must be frozen and in eval mode when this is built (checked). image_size: the input's side, at
    which the stage shapes are probed."""

    def __init__(self, teacher, student, stones, identity_connector=False, image_size=32):
        super().__init__()
        check_frozen_teacher(teacher)
        self.stones = list(stones)
        self.teacher_parts = tuple(teacher.stages()) + (teacher.head(),)
        self.num_stages = len(self.teacher_parts) - 1
        teacher_shapes = models.feature_shapes(teacher, image_size)
        student_shapes = models.feature_shapes(student, image_size)
        self.connectors = nn.ModuleDict()
        for i in self.stones:
            s, t = student_shapes[i - 1], teacher_shapes[i - 1]
            if identity_connector and s == t:
                self.connectors[str(i)] = nn.Identity()
            else:
                self.connectors[str(i)] = Connector(s, t, teacher.feature_kind,
                                                    teacher.stage_output_activation)

    def forward(self, i, student_feature):
        """Y^{N_i} from S_i ... S_1 (x) = `student_feature`; gradients flow through the frozen teacher."""
        x = self.connectors[str(i)](student_feature)
        for teacher_stage in self.teacher_parts[i:self.num_stages]:
            x = teacher_stage(x)
        return self.teacher_parts[-1](x)

    def all_logits(self, student_features):
        return {i: self(i, student_features[i - 1]) for i in self.stones}


# ------------------------------------------------------------------------------------------- the loss

def kd_loss(logits, target_logits, temperature):
    """T^2 KL(softmax(target/T) || softmax(logits/T)), batch mean, in float32: d(p, q) with p = target_logits
    and q = logits, the side that learns first (as Hinton KD's kd_loss(student, teacher, T) everywhere)."""
    log_q = F.log_softmax(logits.float() / temperature, dim=1)
    p = F.softmax(target_logits.float() / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature ** 2


def stone_weight(i, num_stages):
    """w_i = 2^-(n-i): the deepest stepping-stone N_n (the whole student backbone) weighs 1, N_1 weighs
    2^-(n-1)."""
    return 2.0 ** -(num_stages - i)


def warmup_factor(progress, ramp_epochs):
    """r(t): linear from 0 at epoch 0 to 1 at `ramp_epochs` (float epochs), then 1; 1 throughout if 0.
    `progress` is a float, or a 0-dim tensor under --compile (then so is the result)."""
    return 1.0 if ramp_epochs <= 0 else min(1.0, progress / ramp_epochs)


def blockkd_loss(student_logits, teacher_logits, stone_logits, y, *, num_stages, ramp, kd_temperature=4.0,
                 alpha=1.0, beta=1.0, gamma=1.0, detach_ensemble=True, cross_stone_weights=True,
                 label_smoothing=0.0):
    """L = alpha L_task + ramp (beta L_distill + gamma L_cross); returns (loss, logged terms).

    stone_logits: {i: Y^{N_i}} for the active stepping-stones (1-based i, n = num_stages); ramp: r(t).
    The defaults are this file's flags' defaults."""
    T = kd_temperature
    weights = {i: stone_weight(i, num_stages) for i in stone_logits}

    def ce(logits):
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)

    task_loss = ce(student_logits) + sum(weights[i] * ce(z) for i, z in stone_logits.items())
    distill_loss = kd_loss(student_logits, teacher_logits, T) + sum(
        weights[i] * kd_loss(z, teacher_logits, T) for i, z in stone_logits.items())
    cross_loss = torch.zeros((), device=student_logits.device)
    if stone_logits:  # without stepping-stones there is no ensemble and L_cross = 0
        ensemble = torch.stack([z.float() for z in stone_logits.values()]).mean(0)
        if detach_ensemble:
            ensemble = ensemble.detach()
        cross_weights = weights if cross_stone_weights else {i: 1.0 for i in stone_logits}
        cross_loss = kd_loss(student_logits, ensemble, T) + sum(
            cross_weights[i] * kd_loss(z, ensemble, T) for i, z in stone_logits.items())
    loss = alpha * task_loss + ramp * (beta * distill_loss + gamma * cross_loss)
    terms = {"task": task_loss.detach(), "distill": distill_loss.detach(), "cross": cross_loss.detach(),
             "ramp": torch.as_tensor(ramp, dtype=torch.float32, device=student_logits.device)}
    return loss, terms


# ----------------------------------------------------------------------------------- training glue

def parse_stones(text, num_stages):
    """--stones: 'all' -> [1..n], 'none' -> [], '1,3' -> [1, 3]; ValueError for anything else."""
    if text == "all":
        return list(range(1, num_stages + 1))
    if text == "none":
        return []
    try:
        stones = sorted({int(part) for part in text.split(",")})
    except ValueError:
        stones = None
    if not stones or not all(1 <= i <= num_stages for i in stones):
        raise ValueError(f"--stones must be all, none or a comma list of stages 1..{num_stages}, "
                         f"not {text!r}")
    return stones


def resolve_ramp_epochs(args, stones):
    """--ramp-epochs, or by default 20/240 of --epochs with stepping-stones and 0 without them (so that
    the KD baseline is exactly Hinton KD from the first step)."""
    if args.ramp_epochs is not None:
        return args.ramp_epochs
    return DEFAULT_RAMP_FRACTION * common.run_epochs(args) if stones else 0.0


def make_loss_fn(student, teacher, stepping_stones, args, ramp_epochs, label_smoothing):
    """fit's loss_fn(x, y, progress): student stage features once, teacher logits once without grad,
    then each stepping-stone's teacher suffix with grad."""
    weights = dict(kd_temperature=args.kd_temperature, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                   detach_ensemble=args.detach_ensemble, cross_stone_weights=args.cross_stone_weights,
                   label_smoothing=label_smoothing)

    def loss_fn(x, y, progress):
        with torch.no_grad():
            teacher_logits = teacher(x)
        features, student_logits = models.stage_features(student, x)
        stone_logits = stepping_stones.all_logits(features)
        return blockkd_loss(student_logits, teacher_logits, stone_logits, y,
                            num_stages=stepping_stones.num_stages, ramp=warmup_factor(progress, ramp_epochs),
                            **weights)
    return loss_fn


def make_eval_fn(student, stepping_stones):
    """Test accuracy of the student ('test_acc', and 'test_top5' beyond 10 classes) and of each stepping-stone
    ('stone<i>_acc')."""
    def eval_fn(x, y):
        features, logits = models.stage_features(student, x)
        metrics = common.accuracies(logits, y)
        for i, z in stepping_stones.all_logits(features).items():
            metrics[f"stone{i}_acc"] = 100.0 * (z.argmax(1) == y).float().mean()
        return metrics
    return eval_fn


def check_pair(teacher, student):
    """N_i joins student stage i to teacher stage i + 1: both need the same number of stages."""
    if len(student.stages()) != len(teacher.stages()):
        raise SystemExit(f"error: {student.arch} has {len(student.stages())} stages and {teacher.arch} "
                         f"{len(teacher.stages())}: Block-KD's stepping-stones need the same number")


def distill(args, data, teacher, student):
    """Train `student` (already on the data's device) with Block-KD from the frozen `teacher` into
    args.out_dir; returns fit's summary, which also holds the method's fields."""
    check_pair(teacher, student)
    num_stages = len(teacher.stages())
    stones = parse_stones(args.stones, num_stages)
    ramp_epochs = resolve_ramp_epochs(args, stones)
    stepping_stones = SteppingStones(teacher, student, stones, args.identity_connector, data.image_size)
    stepping_stones.to(data.device)
    recipe = common.make_recipe(args, models.model_family(student.arch), model_name=student.arch)
    connector_params = common.count_params(stepping_stones)
    stone_weights = [stone_weight(i, num_stages) for i in stones]
    common.log(f"Block-KD: stepping-stones {stones or 'none'} (weights {stone_weights}), "
               f"{connector_params:,} connector parameters, T {args.kd_temperature}, alpha {args.alpha}, "
               f"beta {args.beta}, gamma {args.gamma}, warm-up {ramp_epochs:g} epochs")
    method_fields = {"method": "blockwise_kd", "blockwise_kd": {
        "stones": stones, "stone_weights": {str(i): stone_weight(i, num_stages) for i in stones},
        "ramp_epochs": ramp_epochs, "connector_params": connector_params,
        "connectors": {i: type(c).__name__ for i, c in stepping_stones.connectors.items()},
        "teacher": teacher.arch, "teacher_params": common.count_params(teacher)}}
    return common.fit(student, data, args.out_dir, recipe,
                      loss_fn=make_loss_fn(student, teacher, stepping_stones, args, ramp_epochs,
                                           recipe["label_smoothing"]),
                      train_modules=[student, stepping_stones],
                      eval_fn=make_eval_fn(student, stepping_stones),
                      title=f"Block-KD {teacher.arch} -> {student.arch}", summary_fields=method_fields,
                      **common.run_options(args, teacher))


def add_args(parser):
    """Block-KD's own flags; every [choice] of the method is one of them."""
    g = parser.add_argument_group("Block-KD")
    g.add_argument("--stones", default="all", metavar="LIST",
                   help="stepping-stones N_i in the loss: all (default), none (plain KD), or a comma list "
                        "like 1,3")
    g.add_argument("--kd-temperature", "-T", type=common.positive_float, default=4.0, metavar="T",
                   help="KD temperature T of d(p, q) (default 4)")
    g.add_argument("--alpha", type=common.nonnegative_float, default=1.0,
                   help="weight of L_task, the cross-entropy terms (default 1)")
    g.add_argument("--beta", type=common.nonnegative_float, default=1.0,
                   help="weight of L_distill, teacher -> student and stepping-stones (default 1)")
    g.add_argument("--gamma", type=common.nonnegative_float, default=1.0,
                   help="weight of L_cross, stepping-stone ensemble -> student and stepping-stones "
                        "(default 1)")
    g.add_argument("--ramp-epochs", type=common.nonnegative_float, default=None, metavar="EPOCHS",
                   help="linear warm-up of the beta and gamma terms from 0 to 1 over this many epochs "
                        "(float). Default: 20/240 of --epochs (20 at 240, like the lr milestones it scales "
                        "with short runs), and 0 (no warm-up) with --stones none, so that the KD baseline is "
                        "exactly Hinton KD from the first step")
    g.add_argument("--cross-stone-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="apply w_i = 2^-(n-i) to the stepping-stone terms inside L_cross too (default yes)")
    g.add_argument("--detach-ensemble", action=argparse.BooleanOptionalAction, default=True,
                   help="treat the ensemble Y^ens as a fixed target with no gradient (default yes)")
    g.add_argument("--identity-connector", action="store_true",
                   help="ablation: no connector where student and teacher stage outputs have the same shape")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Block-wise logit distillation (Block-KD, "
                                     "arXiv:2411.01547): stepping-stone models built from the student's "
                                     "first stages and the frozen teacher's last ones are distilled along "
                                     "with the student.")
    common.add_common_args(parser)
    common.add_distill_args(parser)
    add_args(parser)
    args = parser.parse_args(argv)
    try:  # checked against the teacher's stage count before any data or model is loaded
        stones = parse_stones(args.stones, models.stage_count(args.teacher))
    except ValueError as error:
        parser.error("argument " + str(error).replace("--stones must", "--stones: must"))
    teacher, student, image_size = common.meta_pair(args)  # the pair's shapes, before anything is trained
    check_pair(teacher, student)
    SteppingStones(teacher, student, stones, args.identity_connector, image_size)
    device, data = common.setup(args, "blockwise_kd", parser)
    teacher = common.load_teacher(args, data)
    torch.manual_seed(args.seed)
    student = common.build_model(args.student, data.num_classes, device, sync_bn=args.sync_bn)
    distill(args, data, teacher, student)


if __name__ == "__main__":
    common.run_main(main)

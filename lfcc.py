"""LFCC: low-frequency contrastive knowledge distillation between heterogeneous architectures.

Where to look: the loss is `stage_alignment` (filter -> project -> `info_nce`, per stage) plus CE and
`kd_loss`, put together in `make_loss_fn`; `distill` hands it to `common.fit`, the loop, whose step is
`common.make_train_step` (forward and loss, backward, optimizer step).

Paper: Hongjun Wu, Li Xiao, Xingkuo Zhang, Yining Miao, "Aligning in a Compact Space: Contrastive Knowledge
Distillation between Heterogeneous Architectures", arXiv:2405.18524 (2024). No code is public and only the
abstract could be read: the idea is the paper's **[paper]**; the filter, the projectors, the temperature and
the loss weights are this project's reconstruction **[choice]**, each one a flag below.

    python lfcc.py --teacher resnet32x4 --student mlp_mixer      # CNN -> MLP-Mixer on CIFAR-100
    python lfcc.py --teacher resnet32x4 --student vit            # CNN -> ViT
    python lfcc.py --teacher vit --student resnet8x4 --alpha 0   # ViT -> CNN, LFCC alone (no logit KD)

Idea [paper]. Features of a CNN, a Transformer and an MLP-Mixer look different, so matching them directly
fails. Their low-frequency components carry most of an image feature's content and are what the families
share. LFCC extracts them from intermediate features of both models with multi-scale low-pass filters,
projects them into a small (compact) space and aligns teacher and student there with a sample-level
contrastive loss: the two models' features of the same image are a positive pair, those of the other
images of the batch are negatives.

Reconstruction [choice]. For every distilled stage k (--stages, default 1 2 3), F_s and F_t the stage
outputs of student and teacher, tokens (B, N, D) viewed as maps (B, D, sqrt N, sqrt N):

    F   <- W F  if C > R                                  ChannelReduction: a learned 1x1 conv,
                                                          R = --reduce-channels
    v   = concat_{s in S} flatten(AvgPool_{s x s}(F))     low_pass; S = --scales = {1, 2, 4}: C*21 values
    z_s = normalize(P_s^k v_s), z_t = normalize(P_t^k v_t)  CompactSpace; P: Linear(21*C -> d), d = --proj-dim
    L_k = 1/2 [CE(z_s z_t^T / tau, I) + CE(z_t z_s^T / tau, I)]   info_nce: target = same sample, tau = --tau
    loss = CE(y_s, y) + alpha * T^2 KL(softmax(y_t/T) || softmax(y_s/T)) + beta * mean_k L_k

In the code v_s, v_t are `student_vec`, `teacher_vec`; z_s, z_t are `z_student`, `z_teacher`; y_s, y_t are
`student_logits`, `teacher_logits` (the KD term is `kd_loss(student_logits, teacher_logits, T)`); alpha, beta,
T, tau are `args.alpha`, `args.beta`, `args.kd_temperature`, `args.tau`. Averaging a window keeps exactly its
lowest-frequency (DC) component, so the s x s grid is the map's low-frequency part at scale s, and a 32x32 CNN
map and an 8x8 token grid land on the same grids with no interpolation. The pyramid alone is a
reparametrisation of its finest grid: the 1x1 and 2x2 levels are averages of the 4x4 one, so a Linear
projector sees the same function class with S = {1, 2, 4} as with S = {4}; what the filter does is discard
everything finer than the 4x4 grid. The `--no-lowpass` ablation therefore keeps it: v = flatten(F) at full
resolution (C*H*W values, a larger projector). `--per-scale` is the other reading of "a set of multi-scale
low-pass filters" [choice]: every scale's grid v^s = flatten(AvgPool_{s x s}(F)) gets its own projector pair
and InfoNCE, and L_k is their mean over S (`align_per_scale`); unlike the concatenation this changes the
objective (a separate contrast per scale, the coarse grids no longer mixed with the fine one). Both projectors
train; only the teacher backbone is frozen. The channel reduction (default R = 256, so only the zoo's vgg,
ShuffleNet and ResNet50 stages are reduced) keeps the projectors small for wide models: 21*C inputs per stage
would give ResNet50 -> MobileNetV2 9.8 M projector parameters, 12 times the student; it commutes with the
filter and restricts the projector to one shared R-dimensional channel subspace for all cells (see
ChannelReduction). At initialisation L_k is about ln B, on the scale of the cross-entropy. Logged per epoch:
every stage's loss `lfcc_s<k>` and positive-pair rank accuracy `rank_acc_s<k>` (% of samples whose nearest
teacher embedding is their own; chance 100/B) on training batches, and the same on the test set
(`test_lfcc_s<k>`, `test_rank_acc_s<k>`, batches of 500). Under torchrun the InfoNCE negatives are gathered
over the ranks [choice: the default; `--local-negatives` for each rank's own], so that the contrast is over
the global batch and training does not change with the number of GPUs (`info_nce`).

Setting. The paper's numbers come from 224x224 ImageNet-architecture models (the OFA-KD benchmark: timm
models, CIFAR images upsampled, teachers fine-tuned from ImageNet weights). Those architectures are here
(models/imagenet.py: four stages, class tokens dropped from the grid) with --image-size and
--teacher-weights; this project's CIFAR results are of CIFAR-sized models trained from scratch at 32x32,
not comparable with the paper's tables.
"""
import argparse
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import models


# ----------------------------------------------------------------------------------- low-pass filters
# A filter maps a (B, C, H, W) feature map to a (B, n) vector whose length depends only on C, so that maps
# of different resolutions become comparable. A Gaussian-blur or DCT cut-off variant is one more function.

def multiscale_low_pass(feature_map, scales):
    """(B, C, H, W) -> (B, C * sum(s^2)): the map average-pooled to an s x s grid for every s,
    concatenated."""
    return torch.cat([F.adaptive_avg_pool2d(feature_map, s).flatten(1) for s in scales], dim=1)


def full_resolution(feature_map, scales=None):
    """The --no-lowpass ablation: no filter, the map flattened at its own resolution, (B, C * H * W), so every
    frequency reaches the projector. (Flattening the largest pooled grid instead would not be an ablation:
    the 1x1 and 2x2 levels are averages of the 4x4 one, so the pyramid and its finest grid give a Linear
    projector the same function class; only what lies above the 4x4 grid tells them apart.)"""
    return feature_map.flatten(1)


def low_pass_per_scale(feature_map, scales):
    """The --per-scale reading of "a set of multi-scale low-pass filters": one vector per scale, each aligned
    on its own (a projector pair and an InfoNCE per scale, averaged): [(B, C * s^2) for s in scales]."""
    return [F.adaptive_avg_pool2d(feature_map, s).flatten(1) for s in scales]


def make_filter(args):
    if args.no_lowpass:
        return partial(full_resolution, scales=args.scales)
    return partial(low_pass_per_scale if args.per_scale else multiscale_low_pass, scales=args.scales)


def filter_parts(filtered):
    """A filter's output as a list of the vectors aligned separately: one, except with --per-scale."""
    return filtered if isinstance(filtered, list) else [filtered]


# ---------------------------------------------------------------------------------- the compact space

REDUCED_CHANNELS = 256  # --reduce-channels' default: above the widest CIFAR ResNet/WRN, ViT and Mixer stage


class ChannelReduction(nn.Module):
    """--reduce-channels R [choice]: a learned 1x1 convolution from C to R channels (no bias), applied to a
    stage output wider than R before the filter, so that a projector's input is 21*R values instead of 21*C.

    A 1x1 convolution mixes channels at each position and average pooling mixes positions of each channel with
    the same weights for every channel, so the two commute: the reduced vector is the low-pass vector of the
    reduced map, and no frequency above the filter's gets through. The projector after it is a subset of
    Linear(21*C -> d): every cell's channel weights lie in one shared R-dimensional subspace (the rows of W),
    a real restriction of capacity when R < C. Runs in float32 like the projectors it belongs to."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.conv = nn.Conv2d(channels, reduced, kernel_size=1, bias=False)

    def forward(self, feature_map):
        with torch.autocast(feature_map.device.type, enabled=False):
            return self.conv(feature_map.float())


def channel_reductions(model, stages, reduce_to, image_size=32):
    """One module per distilled stage: a ChannelReduction for an output wider than `reduce_to` channels, else
    nn.Identity (no parameters, no random numbers drawn). `reduce_to` 0: none is reduced."""
    shapes = models.feature_shapes(model, image_size)
    channels = [models.grid_shape(shapes[k - 1])[0] for k in stages]
    return [ChannelReduction(c, reduce_to) if 0 < reduce_to < c else nn.Identity() for c in channels]


class CompactSpace(nn.Module):
    """Per distilled stage (per stage and scale with --per-scale: `parts_per_stage` pairs, stored stage-major)
    a student and a teacher projector, Linear(filtered size -> d), L2-normalised; per distilled stage,
    optionally, each side's channel reduction.

    The teacher projectors train with the student: they learn which of the teacher's low-frequency content to
    offer, while the teacher's own weights stay frozen. The whole space runs in float32, autocast or not:
    the filtered vectors are cast up, the projection, normalisation and (in `info_nce`) the similarities are
    float32 matmuls (on CUDA, TF32 may round their inputs' mantissas unless --deterministic)."""

    def __init__(self, student_sizes, teacher_sizes, dim, student_reductions=(), teacher_reductions=(),
                 parts_per_stage=1):
        super().__init__()
        self.parts_per_stage = parts_per_stage
        self.student = nn.ModuleList(nn.Linear(n, dim) for n in student_sizes)
        self.teacher = nn.ModuleList(nn.Linear(n, dim) for n in teacher_sizes)
        if len(student_reductions) != len(teacher_reductions):
            raise ValueError("give both sides' channel reductions (one per distilled stage each), or neither")
        self.student_reduce = nn.ModuleList(student_reductions)  # empty: no stage is reduced
        self.teacher_reduce = nn.ModuleList(teacher_reductions)

    def reduce(self, index, student_map, teacher_map):
        """Distilled stage `index`'s two maps, each through its channel reduction (if the space has any)."""
        if len(self.student_reduce) == 0:
            return student_map, teacher_map
        return self.student_reduce[index](student_map), self.teacher_reduce[index](teacher_map)

    def forward(self, index, student_vec, teacher_vec, part=0):
        """(z_s, z_t) of distilled stage `index` (and scale `part` with --per-scale)."""
        pair = index * self.parts_per_stage + part
        with torch.autocast(student_vec.device.type, enabled=False):
            z_student = F.normalize(self.student[pair](student_vec.float()), dim=1)
            z_teacher = F.normalize(self.teacher[pair](teacher_vec.float()), dim=1)
        return z_student, z_teacher


def filtered_sizes(model, stages, low_pass, reductions=None, image_size=32):
    """Length of each filtered vector of each distilled stage (stage-major), from a dry run of the filter
    (after each stage's channel reduction, if given) on the stage shapes at image_size."""
    shapes = models.feature_shapes(model, image_size)
    reductions = reductions or [nn.Identity() for _ in stages]
    with torch.no_grad():
        maps = [reduction(models.to_map(torch.zeros(1, *shapes[k - 1])))
                for k, reduction in zip(stages, reductions)]
    return [v.shape[1] for feature_map in maps for v in filter_parts(low_pass(feature_map))]


def check_frozen_teacher(teacher):
    """The teacher must be fixed before it is used: in eval mode (in train mode every batch would move its
    BatchNorm statistics) and without trainable parameters (an optimizer over them would change it)."""
    trainable = sum(p.requires_grad for p in teacher.parameters())
    in_train_mode = sum(m.training for m in teacher.modules())
    if trainable or in_train_mode:
        raise ValueError(f"the teacher must be frozen, but {trainable} of its parameter tensors require grad "
                         f"and {in_train_mode} of its modules are in train mode; call teacher.eval() and "
                         f"teacher.requires_grad_(False) first")


def make_compact_space(student, teacher, stages, low_pass, dim, reduce_channels=REDUCED_CHANNELS,
                       image_size=32):
    """The CompactSpace of a student/teacher pair, its projectors sized by the models' filtered stage outputs
    (at image_size), stage outputs wider than `reduce_channels` (0: none) reduced to it first; checks (once)
    that the teacher is frozen and in eval mode."""
    check_frozen_teacher(teacher)
    student_reductions = channel_reductions(student, stages, reduce_channels, image_size)
    teacher_reductions = channel_reductions(teacher, stages, reduce_channels, image_size)
    student_sizes = filtered_sizes(student, stages, low_pass, student_reductions, image_size)
    teacher_sizes = filtered_sizes(teacher, stages, low_pass, teacher_reductions, image_size)
    return CompactSpace(student_sizes, teacher_sizes, dim, student_reductions, teacher_reductions,
                        parts_per_stage=len(student_sizes) // len(stages))


# ------------------------------------------------------------------------------------------- the loss

def rank_accuracy(similarity):
    """% of rows whose largest entry is on the diagonal: student sample i's nearest teacher sample is i."""
    target = torch.arange(len(similarity), device=similarity.device)
    return 100.0 * (similarity.argmax(1) == target).float().mean()


class GatherAcrossRanks(torch.autograd.Function):
    """Under torchrun: (B_r, d) embeddings of every rank r, concatenated in rank order, with gradient. The
    backward sums, for this rank's rows, what every rank's loss sends them (one all_reduce), as the backward
    of a single process holding the whole batch would. Ranks may hold different B_r (an epoch's last
    batch)."""

    @staticmethod
    def forward(ctx, z):
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros(1, dtype=torch.long, device=z.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(z)], device=z.device))
        sizes = [int(n) for n in sizes]
        padded = z.new_zeros(max(sizes), *z.shape[1:])  # all_gather needs equal shapes
        padded[:len(z)] = z
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.rows = (sum(sizes[:rank]), sum(sizes[:rank + 1]))
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows[0]:ctx.rows[1]]


def gather_across_ranks(z):
    """The whole batch's embeddings on every rank (z itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    return GatherAcrossRanks.apply(z)


def info_nce(z_student, z_teacher, tau, global_negatives=True):
    """Symmetric in-batch InfoNCE of (B, d) unit embeddings, and the positive-pair rank accuracy.

    Row i of z_s z_t^T / tau must pick teacher sample i among the B teacher samples, column i student
    sample i. Under torchrun, with global_negatives [choice, the default; --local-negatives], both sides are
    gathered over the ranks first, so that B is the global batch and the loss, its gradient and the rank
    accuracy are those of single-process training at any number of GPUs; without, each rank contrasts its
    own part only (fewer negatives, a loss that changes with the GPU count).
    Autocast is switched off: in bf16, similarities up to 1/tau = 10 keep only about two decimal digits."""
    if global_negatives:
        z_student, z_teacher = gather_across_ranks(z_student), gather_across_ranks(z_teacher)
    with torch.autocast(z_student.device.type, enabled=False):
        logits = z_student.float() @ z_teacher.float().t() / tau
        target = torch.arange(len(logits), device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    return loss, rank_accuracy(logits.detach())


def mse_alignment(z_student, z_teacher, tau=None):
    """The --loss mse ablation: the same unit vectors pulled together per sample, no negatives. Nothing stops
    both projectors from collapsing to one constant vector; that is what the contrast is for."""
    with torch.autocast(z_student.device.type, enabled=False):
        z_student, z_teacher = z_student.float(), z_teacher.float()
        loss = (z_student - z_teacher).pow(2).sum(1).mean()
        similarity = z_student.detach() @ z_teacher.detach().t()
    return loss, rank_accuracy(similarity)


def kd_loss(logits, target_logits, temperature):
    """T^2 KL(softmax(target/T) || softmax(logits/T)), batch mean, in float32 (Hinton et al.): the logit KD
    term with logits = y_s, target_logits = y_t."""
    log_q = F.log_softmax(logits.float() / temperature, dim=1)
    p = F.softmax(target_logits.float() / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature ** 2


def stage_alignment(x, student, teacher, space, low_pass, *, stages=(1, 2, 3), tau=0.1, loss="infonce",
                    global_negatives=True):
    """One forward pass of both models: logits of each, and per distilled stage (alignment loss, rank acc).
    `stages` are 1-based and index space's projectors in order; `loss` is "infonce" or "mse";
    global_negatives: see info_nce."""
    with torch.no_grad():
        teacher_features, teacher_logits = models.stage_features(teacher, x)
    student_features, student_logits = models.stage_features(student, x)
    align = partial(info_nce, global_negatives=global_negatives) if loss == "infonce" else mse_alignment
    per_stage = []
    for index, k in enumerate(stages):
        # outside no_grad: a teacher-side channel reduction is trained (the teacher's map needs no gradient)
        student_map, teacher_map = space.reduce(index, models.to_map(student_features[k - 1]),
                                                models.to_map(teacher_features[k - 1]))
        student_vec, teacher_vec = low_pass(student_map), low_pass(teacher_map)      # filter
        if isinstance(student_vec, list):  # --per-scale: a vector per scale, each aligned on its own
            per_stage.append(align_per_scale(space, index, student_vec, teacher_vec, align, tau))
        else:
            per_stage.append(align(*space(index, student_vec, teacher_vec), tau))  # project, align: L_k
    return student_logits, teacher_logits, per_stage


def align_per_scale(space, index, student_vecs, teacher_vecs, align, tau):
    """The --per-scale reading [choice]: L_k = the mean over scales of each scale's alignment (its own
    projector pair and InfoNCE); the rank accuracy likewise."""
    aligned = [align(*space(index, student_vec, teacher_vec, part=scale), tau)
               for scale, (student_vec, teacher_vec) in enumerate(zip(student_vecs, teacher_vecs))]
    return tuple(torch.stack(values).mean() for values in zip(*aligned))


def make_loss_fn(args, recipe, student, teacher, space, low_pass):
    """fit's loss_fn(x, y, progress): CE + alpha KD + beta mean_k L_k, with every term logged."""
    alignment = dict(stages=args.stages, tau=args.tau, loss=args.loss,
                     global_negatives=not args.local_negatives)

    def loss_fn(x, y, progress):
        student_logits, teacher_logits, per_stage = stage_alignment(x, student, teacher, space, low_pass,
                                                                    **alignment)
        ce = F.cross_entropy(student_logits.float(), y, label_smoothing=recipe["label_smoothing"])
        kd = kd_loss(student_logits, teacher_logits, args.kd_temperature)
        lfcc = torch.stack([loss for loss, _ in per_stage]).mean()
        terms = {"ce": ce, "kd": kd, "lfcc": lfcc}
        for k, (loss, accuracy) in zip(args.stages, per_stage):
            terms[f"lfcc_s{k}"], terms[f"rank_acc_s{k}"] = loss, accuracy
        return ce + args.alpha * kd + args.beta * lfcc, terms
    return loss_fn


def make_eval_fn(args, student, teacher, space, low_pass):
    """Test accuracy of the student, and each stage's alignment loss and rank accuracy on test batches."""
    alignment = dict(stages=args.stages, tau=args.tau, loss=args.loss,
                     global_negatives=not args.local_negatives)

    def eval_fn(x, y):
        student_logits, _, per_stage = stage_alignment(x, student, teacher, space, low_pass, **alignment)
        metrics = common.accuracies(student_logits, y)
        for k, (loss, accuracy) in zip(args.stages, per_stage):
            metrics[f"test_lfcc_s{k}"], metrics[f"test_rank_acc_s{k}"] = loss, accuracy
        return metrics
    return eval_fn


# ------------------------------------------------------------------------------------- training glue

def reduced_note(space, stages, reduce_channels):
    """'student stages [..] and teacher stages [..] reduced to R channels; ' for the log line, or ''."""
    sides = [(side, [k for k, r in zip(stages, reductions) if isinstance(r, ChannelReduction)])
             for side, reductions in (("student", space.student_reduce), ("teacher", space.teacher_reduce))]
    named = [f"{side} stage{'s' * (len(ks) > 1)} {', '.join(map(str, ks))}" for side, ks in sides if ks]
    return f"{' and '.join(named)} reduced to {reduce_channels} channels; " if named else ""


def distill(args, data, teacher, student):
    """Train `student` (already on the data's device) with LFCC from the frozen `teacher` into args.out_dir;
    returns fit's summary, which also holds the method's fields.

    The projectors train with the student (train_modules) and are kept in the resumable checkpoint only:
    model.pth holds the student alone."""
    low_pass = make_filter(args)
    space = make_compact_space(student, teacher, args.stages, low_pass, args.proj_dim, args.reduce_channels,
                               data.image_size).to(data.device)
    recipe = common.make_recipe(args, models.model_family(student.arch), model_name=student.arch)
    filtered = "no low-pass (full resolution)" if args.no_lowpass else f"low-pass scales {args.scales}"
    per_scale = ", one alignment per scale" if args.per_scale and not args.no_lowpass else ""
    weights = f"tau {args.tau}, alpha {args.alpha}, beta {args.beta}, T {args.kd_temperature}"
    reduced = reduced_note(space, args.stages, args.reduce_channels)
    common.log(f"lfcc: stages {args.stages}, {filtered}{per_scale}, {args.loss} in {args.proj_dim} dims, "
               f"{weights}; {reduced}projectors {common.count_params(space):,} params")
    method_fields = {"method": "lfcc", "lfcc": {
        "teacher": teacher.arch, "student": student.arch, "stages": args.stages,
        "filter": "full_resolution" if args.no_lowpass else
                  "low_pass_per_scale" if args.per_scale else "multiscale_low_pass", "scales": args.scales,
        "loss": args.loss, "proj_dim": args.proj_dim, "tau": args.tau, "alpha": args.alpha, "beta": args.beta,
        "kd_temperature": args.kd_temperature, "reduce_channels": args.reduce_channels,
        "global_negatives": not args.local_negatives,
        "projector_params": common.count_params(space)}}
    return common.fit(student, data, args.out_dir, recipe,
                      loss_fn=make_loss_fn(args, recipe, student, teacher, space, low_pass),
                      train_modules=[student, space],
                      eval_fn=make_eval_fn(args, student, teacher, space, low_pass),
                      title=f"lfcc {teacher.arch} -> {student.arch}", summary_fields=method_fields,
                      **common.run_options(args, teacher))


def add_args(parser):
    """LFCC's own flags; also makes the MLP-Mixer the default student (call after add_distill_args)."""
    parser.set_defaults(student="mlp_mixer")
    g = parser.add_argument_group("LFCC (the filter, space and weights are this project's reconstruction)")
    g.add_argument("--stages", type=common.positive_int, nargs="+", default=[1, 2, 3], metavar="K",
                   help="stage outputs aligned, stage k of the student with stage k of the teacher "
                        "(default: every stage, 1 2 3 for the CIFAR zoo)")
    g.add_argument("--scales", type=common.positive_int, nargs="+", default=[1, 2, 4],
                   help="grid sizes s of the multi-scale low-pass filter: every map is average-pooled to "
                        "s x s (default 1 2 4: C*21 values per stage)")
    g.add_argument("--no-lowpass", action="store_true",
                   help="ablation: no low-pass filter; each stage output is flattened at its full resolution "
                        "(C*H*W values, every frequency) and projected by a Linear like the filtered vector")
    g.add_argument("--per-scale", action="store_true",
                   help="one alignment per scale: a projector pair and an InfoNCE for every s of --scales, "
                        "averaged into L_k (default: the scales' grids concatenated into one vector per "
                        "stage)")
    g.add_argument("--reduce-channels", type=common.nonnegative_int, default=REDUCED_CHANNELS, metavar="R",
                   help="a stage output wider than R channels first passes a learned 1x1 conv to R channels, "
                        "so the projectors stay small for wide models (ResNet50, vgg, ShuffleNet); 0: never. "
                        "Default 256: the CIFAR ResNets, WRNs, ViT and Mixer are never reduced")
    g.add_argument("--proj-dim", type=common.positive_int, default=128,
                   help="dimension d of the compact space (default 128)")
    g.add_argument("--tau", type=common.positive_float, default=0.1, help="InfoNCE temperature (default 0.1)")
    g.add_argument("--loss", choices=["infonce", "mse"], default="infonce",
                   help="alignment in the compact space: symmetric in-batch InfoNCE (default), or the "
                        "ablation mse: squared distance of the same unit vectors, no negatives")
    g.add_argument("--local-negatives", action="store_true",
                   help="under torchrun: each rank's InfoNCE contrasts its own part of the batch only "
                        "(default: the embeddings of all ranks are gathered, the global batch's negatives)")
    g.add_argument("--alpha", type=common.nonnegative_float, default=1.0,
                   help="weight of the logit KD term (default 1; 0: LFCC alone)")
    g.add_argument("--beta", type=common.nonnegative_float, default=1.0,
                   help="weight of the mean per-stage alignment loss (default 1)")
    g.add_argument("--kd-temperature", "-T", type=common.positive_float, default=4.0, metavar="T",
                   help="temperature T of the logit KD term (default 4)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="LFCC: low-frequency contrastive distillation between "
                                     "heterogeneous architectures (CNN, ViT, MLP-Mixer).")
    common.add_common_args(parser)
    common.add_distill_args(parser)
    add_args(parser)
    args = parser.parse_args(argv)
    num_stages = min(models.stage_count(args.teacher), models.stage_count(args.student))
    parser.set_defaults(stages=list(range(1, num_stages + 1)))  # the default: every stage both models have
    args = parser.parse_args(argv)
    if max(args.stages) > num_stages:
        parser.error(f"argument --stages: {args.teacher} and {args.student} have stages 1..{num_stages} in "
                     f"common, not {max(args.stages)}")
    if args.per_scale and args.no_lowpass:
        parser.error("--per-scale aligns the scales of the low-pass filter one by one; --no-lowpass has none")
    args.stages = sorted(set(args.stages))
    teacher, student, image_size = common.meta_pair(args)  # the pair's shapes, before anything is trained
    make_compact_space(student, teacher, args.stages, make_filter(args), args.proj_dim, args.reduce_channels,
                       image_size)
    device, data = common.setup(args, "lfcc", parser)
    teacher = common.load_teacher(args, data)
    torch.manual_seed(args.seed)
    student = common.build_model(args.student, data.num_classes, device, sync_bn=args.sync_bn)
    distill(args, data, teacher, student)


if __name__ == "__main__":
    common.run_main(main)

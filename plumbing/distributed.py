"""torchrun: the ranks, their shares of each batch, DistributedDataParallel over the trained modules, and
rank 0 deciding for all (its refusals reaching every rank as its one line)."""
import os

import torch
import torch.distributed as dist
import torch.nn as nn


def world_size():
    """The number of processes training together: torchrun's WORLD_SIZE once the process group is up,
    else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    """This process's place among them (0 alone; torchrun's RANK before the group is up): rank 0 logs and
    writes every file."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def sum_across_ranks(values):
    """{name: tensor} with every tensor summed over the ranks (one all_reduce; unchanged in a single
    process)."""
    if world_size() == 1:
        return values
    stacked = torch.stack([v.float() for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked))


def shard_bounds(start, stop, rank, world):
    """This rank's contiguous part [lo, hi) of the global batch [start, stop): the world's parts differ in
    size by at most one and together are the batch ([start, stop) itself in a single process)."""
    size, extra = divmod(stop - start, world)
    lo = start + rank * size + min(rank, extra)
    return lo, lo + size + (rank < extra)


def test_batch_bounds(n, batch_size, shard):
    """This rank's part [lo, hi) of each global test batch of `n` images: under torchrun a last batch smaller
    than the world size joins the one before it, so that no rank's part is empty."""
    starts = list(range(0, n, batch_size))
    if shard[1] > 1 and len(starts) > 1 and n - starts[-1] < shard[1]:
        starts.pop()
    return [shard_bounds(start, stop, *shard) for start, stop in zip(starts, starts[1:] + [n])]


class TrainedModules(nn.Module):
    """What DDP wraps under torchrun: the trained modules, with the method's loss as the forward, so that the
    gradients of all of them are averaged over the ranks in the backward pass (OFA-KD's pattern: the whole
    distiller in DDP, the frozen teacher held by the loss, outside it)."""

    def __init__(self, modules, loss_fn):
        super().__init__()
        self.trained = nn.ModuleList(modules)
        self.loss_fn = loss_fn

    def forward(self, x, y, progress):
        return self.loss_fn(x, y, progress)


def distributed_loss(train_modules, loss_fn, device, sync_bn=False):
    """loss_fn through DistributedDataParallel over the train modules (their BatchNorms synchronised across
    ranks first with sync_bn). DDP starts every rank from rank 0's parameters and buffers."""
    if sync_bn:
        for module in train_modules:
            synchronise_batchnorm(module)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(TrainedModules(train_modules, loss_fn), device_ids=device_ids)


def init_distributed(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL with one GPU per rank (cuda:LOCAL_RANK,
    for --device cuda) or gloo on CPU. --batch-size stays the global batch, split over the ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is not None:
            raise SystemExit(f"error: under torchrun use --device cuda, not {args.device}: rank r takes "
                             f"cuda:LOCAL_RANK (set CUDA_VISIBLE_DEVICES to choose the GPUs)")
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def on_rank_0(fn, *args, share=True):
    """fn(*args) on rank 0 alone (the run-folder claim, the lock, a file copy), its result returned on every
    rank (with share; else on rank 0 only); its refusal, a SystemExit with a message, reaches every rank, so
    that all stop with rank 0's line instead of waiting for it or adding a traceback of their own."""
    if world_size() == 1:
        return fn(*args)
    outcome, result = [None, None], None  # [exit code, shared result]
    if rank() == 0:
        try:
            result = fn(*args)
            outcome[1] = result if share else None
        except SystemExit as stop:
            outcome[0] = stop.code if stop.code is not None else 0
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise SystemExit(outcome[0])
    return result if rank() == 0 else outcome[1]


def on_rank_0_first(fn, *args):
    """fn(*args) on rank 0, then on the other ranks (so that rank 0 alone downloads a dataset); rank 0's
    refusal (a bad flag, an unreadable file) stops every rank with its one line, as on_rank_0's."""
    if world_size() == 1:
        return fn(*args)
    result = on_rank_0(fn, *args, share=False)
    return result if rank() == 0 else fn(*args)


def from_rank_0(value):
    """Rank 0's value on every rank (a decision taken from the disk as rank 0 sees it)."""
    if world_size() == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]



def synchronise_batchnorm(module):
    """--sync-bn: every BatchNorm inside `module` becomes a SyncBatchNorm, in place (torch's
    convert_sync_batchnorm: the same parameters, statistics and state_dict keys), so that its statistics are
    over all ranks' images."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if converted is not module:  # a BatchNorm itself is replaced, not converted in place
        raise ValueError("synchronise_batchnorm converts the BatchNorms inside a module, not a BatchNorm")

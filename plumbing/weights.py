"""Weight files and the teacher cache: one loader with one-line checks for every weights file (teachers,
--pretrained, --evaluate), torchvision's weights, a new head for fine-tuning, and the cache of teachers under
--checkpoint-dir (where a teacher of this data is, who makes a missing one, the run's own copy of it)."""
import functools
import os
import re
from pathlib import Path

import torch

from models import (IMAGENET_MODELS, MODEL_NAMES, TORCHVISION_MODELS, classifier, create_model,
                    state_dict_classes)
from plumbing.distributed import from_rank_0
from plumbing.files import FileLock, ensure_writable, write_atomic
from plumbing.identity import dataset_tag, fingerprint
from plumbing.runfolder import RUN_TEACHER
from plumbing.session import log, session


def read_weights(path, arch, num_classes):
    """The state_dict of a weights file (the benchmark format, ours, or a bare state_dict; DDP's 'module.'
    prefixes dropped) and what the file holds, checked to be `arch` with `num_classes` classes: the one
    loader of teachers, --pretrained files and --evaluate. Every other file is one line: a folder, none,
    unreadable or unsafe to unpickle (never torch's advice to load it unsafely), no state_dict, another
    architecture or class count (named where the keys tell it), or keys that differ (counted, with
    examples)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SystemExit(f"error: checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # Not torch's message: it names the exception's cause and suggests weights_only=False (unsafe).
        raise SystemExit(f"error: {path} is not a readable PyTorch checkpoint ({type(error).__name__}); it "
                         "must hold tensors only: a state_dict, or a dict with a 'model' entry") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise SystemExit(f"error: {path} holds no state_dict (expected a dict of tensors, or a dict with a "
                         "'model' entry)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    wanted = state_dict_shapes(arch, num_classes)
    if {k: tuple(v.shape) for k, v in state.items()} == wanted:
        return state, checkpoint
    found_arch = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
    found_arch = found_arch or identify_architecture(state)
    if found_arch is not None and (found_arch, state_dict_classes(state)) != (arch, num_classes):
        raise SystemExit(f"error: {path} holds {found_arch} with {state_dict_classes(state)} classes, but "
                         f"{arch} with {num_classes} classes was asked for")
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    reshaped = sorted(k for k in set(wanted) & set(state) if tuple(state[k].shape) != wanted[k])
    found = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
             ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if keys]
    raise SystemExit(f"error: {path} is not a state_dict of {arch} with {num_classes} classes: its keys "
                     f"differ, {', '.join(found)}")


def load_weights(model, path):
    """Load a checkpoint (benchmark format, ours, or a bare state_dict) into `model`, strictly (read_weights);
    returns what the file holds."""
    state, checkpoint = read_weights(path, model.arch, classifier(model).out_features)
    model.load_state_dict(state, strict=True)
    return checkpoint


@functools.cache  # a function of the code alone; identify_architecture asks for every model
def state_dict_shapes(arch, num_classes):
    """{key: shape} of the state_dict of `arch` with `num_classes` classes, from a model on the meta device."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in create_model(arch, num_classes).state_dict().items()}


def identify_architecture(state_dict):
    """The zoo name whose state_dict keys and shapes match, or None."""
    num_classes = state_dict_classes(state_dict) or 100
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    return next((name for name in MODEL_NAMES if state_dict_shapes(name, num_classes) == shapes), None)


def torchvision_weights(name, weights_name, run_copy=None):
    """torchvision's `weights_name` weights (IMAGENET1K_V1, ...) of the ImageNet model `name` (tv_*), through
    its weights API: from the hub cache under TORCH_HOME, downloaded there when the network allows; one line
    naming the file and where to put it otherwise (run_copy: a resumed run's copy of that file instead).
    Returns (state_dict, {file, accuracy})."""
    import torchvision

    from models.imagenet import torchvision_classes

    if name not in TORCHVISION_MODELS:
        raise SystemExit(f"error: {name} has no torchvision weights; torchvision's models here: "
                         f"{', '.join(TORCHVISION_MODELS)}")
    source = torchvision_classes()[name][0]
    choices = torchvision.models.get_model_weights(source)
    if weights_name not in choices.__members__:
        raise SystemExit(f"error: torchvision has no {weights_name} weights for {source}; it has "
                         f"{', '.join(choices.__members__)}")
    weights = choices[weights_name]
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    accuracy = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    if run_copy is not None:
        return torch.load(run_copy, map_location="cpu", weights_only=True), {"file": str(run_copy),
                                                                             "accuracy": accuracy}
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as error:  # no network (URLError), a broken file, ...
        raise SystemExit(f"error: cannot load torchvision's {source} {weights_name} weights "
                         f"({type(error).__name__}); without a network, download {weights.url} elsewhere and "
                         f"put it at {target}") from None
    return state, {"file": str(target), "accuracy": accuracy}


def pretrained_weights(name, weights):
    """--pretrained: torchvision's weights of that name, or a file of the model's 1000-class ImageNet
    state_dict (a bare one or the benchmark format {'model': ...}), read as every weights file is
    (read_weights). Returns (state_dict, {file, accuracy})."""
    if name not in IMAGENET_MODELS:
        raise SystemExit(f"error: --pretrained starts an ImageNet model from its 1000-class weights, and "
                         f"{name} is a CIFAR model; pass a trained one to the methods with --teacher-ckpt")
    path = Path(weights).expanduser()
    if path.exists() or "/" in weights or path.suffix in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
        state, _ = read_weights(path, name, 1000)  # a path, not one of torchvision's weights names
        return state, {"file": str(weights), "accuracy": None}
    return torchvision_weights(name, weights)


def start_from_weights(name, state, num_classes, device):
    """Model `name` with ImageNet weights (strictly: torchvision's, or a file's), its 1000-class Linear
    replaced by a fresh one for num_classes other than 1000 (the fine-tuning start of the OFA/LFCC CIFAR
    protocol)."""
    from models.imagenet import replace_classifier

    model = create_model(name, 1000)
    model.load_state_dict(state, strict=True)
    if num_classes != 1000:
        replace_classifier(model, num_classes)
    return model.to(device)


STANDARD_TEACHER_EPOCHS = 240


def teacher_path(args, data, name, epochs=STANDARD_TEACHER_EPOCHS, weights=None):
    """Where a teacher of this data is cached: checkpoints/<data>/<name>.pth for the standard 240 epochs,
    <name>_<E>ep.pth for E others (see dataset_tag), so that a short smoke-run teacher is never taken for
    it; <name>-<WEIGHTS>... for one fine-tuned from torchvision's WEIGHTS, never taken for one trained from
    scratch."""
    start = "" if weights is None else f"-{weights}"
    suffix = "" if epochs == STANDARD_TEACHER_EPOCHS else f"_{epochs}ep"
    return Path(args.checkpoint_dir) / dataset_tag(args, data) / f"{name}{start}{suffix}.pth"


def teacher_candidates(args, data):
    root = Path(args.checkpoint_dir)
    weights = getattr(args, "teacher_weights", None)
    paths = [teacher_path(args, data, args.teacher, args.teacher_epochs, weights)]
    standard = args.teacher_epochs == STANDARD_TEACHER_EPOCHS and not weights
    if args.dataset == "cifar100" and not args.train_subset and standard:
        paths += [root / f"{args.teacher}_vanilla" / "ckpt_epoch_240.pth",  # the public benchmark layout
                  root / "cifar_teachers" / f"{args.teacher}_vanilla" / "ckpt_epoch_240.pth"]
    return paths


def teacher_source(args, data):
    """Where the run's teacher comes from, decided in one place from the flags and the disk as rank 0 sees
    it: ("run", path) for the run's own copy, when it is resumed (from the cache: a --teacher-ckpt given is
    read, and checked against the run's teacher, see run_identity); ("torchvision", None) for torchvision's
    --teacher-weights as they are (data of 1000 classes); ("file", path) for --teacher-ckpt or a teacher
    found in the cache; ("train", path) for one that is trained (or fine-tuned) first and cached at path."""
    weights = getattr(args, "teacher_weights", None)
    if weights and args.teacher_ckpt:
        raise SystemExit("error: --teacher-weights and --teacher-ckpt each give the teacher; pass one")
    copy = run_teacher_copy(args)
    if getattr(args, "resume", False) and copy and not args.teacher_ckpt and from_rank_0(copy.is_file()):
        return "run", copy
    if weights and data.num_classes == 1000:
        return "torchvision", None
    if args.teacher_ckpt:
        return "file", Path(args.teacher_ckpt)
    candidates = teacher_candidates(args, data)
    found = from_rank_0(next((p for p in candidates if p.exists()), None))
    return ("file", found) if found else ("train", candidates[0])


def run_teacher_copy(args):
    """Where a run keeps the copy of its teacher's file (None for a teacher loaded outside a run folder)."""
    return Path(args.out_dir) / RUN_TEACHER if getattr(args, "out_dir", None) else None


def claim_teacher(path, wait, replace=False):
    """One process at a time makes (trains, fine-tunes or saves) the teacher cached at `path`: it holds an OS
    lock on the hidden .<name>.lock beside it until the teacher is in place (place_teacher) or it exits.
    Another holder is waited for with wait (saying so), else refused in one line. Returns whether the teacher
    is still to be made: False when another process made it meanwhile (unless it is to be replaced)."""
    ensure_writable(path.parent, "--checkpoint-dir")
    lock = FileLock(path.with_name(f".{path.name}.lock"))
    if not lock.acquire():
        busy = f"another process is making the teacher {path} (it holds {lock.path})"
        if not wait:
            raise SystemExit(f"error: {busy}; run this again once it is done (a method run then uses it)")
        log(f"{busy}; waiting for it to finish (Ctrl-C stops this run)")
        lock.acquire(wait=True)
    if path.exists() and not replace:
        lock.release()
        log(f"the teacher {path} was made by another process meanwhile: this run uses it")
        return False
    session.teacher_claims[path] = lock
    return True


def claim_teacher_file(teacher_file, overwrite):
    """--save-as-teacher, before training: the teacher's place is free (or --overwrite), writable, and claimed
    by this run (claim_teacher), so that two runs never replace each other's teacher."""
    exists = f"error: {teacher_file} exists; move it away first, or add --overwrite to replace it"
    if teacher_file.exists() and not overwrite:
        raise SystemExit(exists)
    ensure_writable(teacher_file.parent, "--checkpoint-dir")
    if not claim_teacher(teacher_file, wait=False, replace=overwrite):  # made since the check above
        raise SystemExit(exists)


def place_teacher(source, target, replace, move=False):
    """The teacher made in `source` (a model.pth) put in the cache at `target` (moved there with move, else
    copied), claimed by this process (claim_teacher), which then lets go of the claim. A teacher already
    there is replaced only with `replace`, and then with a line saying so."""
    target = Path(target)
    if target.exists() and not replace:
        raise SystemExit(f"error: {target} appeared while this run made its teacher; nothing was replaced. "
                         f"The teacher made here is {source}")
    replaced = target.exists()
    try:
        os.replace(source, target) if move else write_atomic(target, Path(source).read_bytes())
    except OSError as error:
        raise SystemExit(f"error: cannot move {source} to {target} ({error.strerror or error})") from None
    if replaced:
        log(f"replaced the earlier teacher {target}")
    lock = session.teacher_claims.pop(target, None)
    if lock:
        lock.release()


def keep_teacher_copy(source, copy):
    """The run's own copy of its teacher's file, so that a resume reads the teacher it was distilled from,
    whatever the shared cache holds by then: a hard link where the file system allows (no space taken; the
    cache replaces files through a rename, which leaves the link's content as it was), else a copy."""
    source, copy = Path(source), Path(copy)
    if copy.exists() and copy.samefile(source):
        return
    tmp = copy.with_name(copy.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, copy)
    except OSError:  # another file system, or links not allowed
        tmp.unlink(missing_ok=True)
        write_atomic(copy, source.read_bytes())


def torchvision_teacher(args, data, run_copy=None):
    """--teacher-weights NAME on data of ImageNet's 1000 classes: torchvision's weights are the teacher, as
    they are (from the run's copy of their file on a resume). Their outputs are ImageNet's classes in the
    sorted order of the wnids: the class folders must be named so (checked), and --teacher-epochs has
    nothing to train (said)."""
    named = [name for name in data.classes or [] if not re.fullmatch(r"n\d{8}", name)]
    if data.classes is None or named:
        shown = f"{', '.join(named[:3])}{', ...' if len(named) > 3 else ''}" if named else "not named"
        raise SystemExit(f"error: torchvision's {args.teacher_weights} weights output ImageNet's classes in "
                         "the sorted order of their wnids (n01440764, n01443537, ...), but this data's 1000 "
                         f"classes are {shown}: name the class folders by their wnids, or train a teacher on "
                         "this data")
    state, record = torchvision_weights(args.teacher, args.teacher_weights, run_copy)
    teacher = start_from_weights(args.teacher, state, 1000, data.device)
    teacher.source = {"file": record["file"], "epochs": None, "accuracy": None,
                      "published_accuracy": record["accuracy"], "data": None}
    unused = (f"; --teacher-epochs {args.teacher_epochs} is not used: there is nothing to fine-tune"
              if args.teacher_epochs != STANDARD_TEACHER_EPOCHS else "")
    log(f"teacher {args.teacher}: torchvision's {args.teacher_weights} weights as they are (published "
        f"ImageNet top-1 {record['accuracy']}){unused}")
    return teacher


def teacher_record(teacher):
    """The teacher of a run, for summary.json and the checkpoint's identity: its architecture, a fingerprint
    of its weights, and where load_teacher found it (file, epochs, accuracy, data fingerprint)."""
    weights = fingerprint(*teacher.state_dict().values())
    return {"arch": teacher.arch, "weights": weights, **getattr(teacher, "source", {})}

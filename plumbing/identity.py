"""What identifies a run and its data: the training flags (as against the flags of a run's place and
speed), content fingerprints, the default folder names, a checkpoint's identity, and the differences named
when a resume is refused."""
import hashlib
import json
from pathlib import Path


# Flags that do not change what a run learns. They may differ when a run is resumed (a moved data folder,
# another device) and are left out of default run-folder names. --amp and the other speed flags change
# float rounding only; --eval-every and --test-subset what is measured.
RUN_ONLY_FLAGS = {"out_dir", "resume", "overwrite", "data_dir", "workers", "checkpoint_dir", "log_every",
                  "eval_every", "test_subset", "device", "amp", "channels_last", "compile", "deterministic",
                  "teacher_ckpt", "save_as_teacher", "allow_data_change", "accepted_data", "evaluate"}

NAMED_FLAGS = {"model", "teacher", "student", "dataset", "image_size", "train_subset", "seed"}  # in the name

DATA_ENTRY = "the data (content fingerprint)"  # the data's name among a run's entries (flag_entries)


def fingerprint(*tensors):
    """16 hex digits of SHA-1 over the tensors' bytes: what a run and a teacher were trained on, by content
    (not by path: two folders of the same name hold different images). About 0.3 s for CIFAR-100."""
    digest = hashlib.sha1()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def training_flags(config):
    """The entries of a run's flags (vars(args)) that define what it learns, as JSON values."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in RUN_ONLY_FLAGS}, default=str))


def training_config(args, data):
    """What run.json records of a run: its training flags and its data's fingerprint."""
    return {**training_flags(vars(args)), "data": data.fingerprint}


def flag_value(value):
    return "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def dataset_tag(args, data):
    """Names the data of a run, in default run folders and teachers' places under checkpoints/: the dataset
    (cifar100, cifar10 and synthetic are fixed), for a folder its name and the first 8 digits of the content
    fingerprint (two folders called images/ are told apart), the image size where it is not 32 and the
    subset."""
    tag = args.dataset
    if args.dataset == "folder":
        tag = f"folder-{Path(args.data_dir).expanduser().resolve().name}-{data.fingerprint[:8]}"
    elif args.dataset == "imagenet":
        tag = f"imagenet-{data.fingerprint[:8]}"
    size = getattr(data, "image_size", 32)
    tag += f"-{size}px" if size != 32 else ""
    return tag + (f"-subset{args.train_subset}" if args.train_subset else "")


def default_out_dir(args, parser, run_name, data):
    """runs/<name>_<data>_seed<S>, then every training flag that differs from its default, e.g.
    runs/blockwise_kd_resnet32x4_resnet8x4_cifar100_seed0_alpha0.1_beta0.9_gamma0.0_stones-none, so that two
    commands that train differently never share a folder (a hash replaces a list longer than 80
    characters)."""
    changed = []
    for key, value in sorted(vars(args).items()):
        if key in RUN_ONLY_FLAGS | NAMED_FLAGS or value == parser.get_default(key):
            continue
        if isinstance(value, bool):
            changed.append(key.replace("_", "-") if value else "no-" + key.replace("_", "-"))
        else:
            name, dash = key.replace("_", "-"), "-" if isinstance(value, str) else ""
            changed.append(f"{name}{dash}{flag_value(value)}")
    suffix = "_".join(changed)
    if len(suffix) > 80:
        suffix = "flags-" + hashlib.sha1(suffix.encode()).hexdigest()[:10]
    name = f"{run_name}_{dataset_tag(args, data)}_seed{args.seed}" + (f"_{suffix}" if suffix else "")
    return str(Path("runs") / name)


def run_identity(model, data, recipe, seed, config, teacher, title):
    """What one fit trains, as its checkpoint records it: the run's training flags (a method's included), the
    model, seed, data and recipe, the teacher's weights, and the part of the run (`title`). A checkpoint of
    anything else is not resumed."""
    return json.loads(json.dumps({
        "flags": training_flags(config or {}), "model": model.arch, "seed": seed, "data": data.fingerprint,
        "recipe": recipe, "teacher": teacher and {k: teacher[k] for k in ("arch", "weights")},
        "part": title or model.arch}, default=str))


def flag_entries(config):
    """A run's training flags as {'--name': value}, its data fingerprint under its own name (for messages)."""
    return {(DATA_ENTRY if k == "data" else "--" + k.replace("_", "-")): v for k, v in config.items()}


def identity_entries(identity):
    """A checkpoint's identity (see run_identity) as {name in messages: value}."""
    entries = flag_entries({**identity.get("flags", {}), "data": identity.get("data")})
    entries.update({f"the recipe's {k}": v for k, v in (identity.get("recipe") or {}).items()})
    entries.update({f"the teacher's {k}": v for k, v in (identity.get("teacher") or {}).items()})
    entries.update({"the model": identity.get("model"), "the seed": identity.get("seed"),
                    "the part of the run": identity.get("part")})
    return entries


def differences(saved, current, whose, names=None):
    """'--epochs 3 (the run has 2)' for every entry (see flag_entries) of `names` (default: all) whose value
    differs; an entry that `saved` lacks (a flag newer than the run) differs from any value."""
    found = []
    for name in sorted(names or set(saved) | set(current)):
        if name not in saved:
            found.append(f"{name} {flag_value(current.get(name))} ({whose} has no record of it)")
        elif saved[name] != current.get(name):
            found.append(f"{name} {flag_value(current.get(name))} ({whose} has {flag_value(saved[name])})")
    return found


def same_data(entries, accepted, config):
    """A run's entries with its data fingerprint read as this data's where the run accepted it as such."""
    if entries.get(DATA_ENTRY) in accepted:
        entries = {**entries, DATA_ENTRY: config["data"]}
    return entries


def data_record(data):
    """What a data change may not alter (data_change): the classes, and the images per split within 1 %."""
    names = hashlib.sha1("\n".join(data.classes).encode()).hexdigest()[:16] if data.classes else None
    return {"classes": data.num_classes, "class_names": names, "train_images": len(data.train_y),
            "test_images": len(data.test_y)}

"""Helpers of tests/test_readme_commands.py: README.md's command lines as a shell reads them, and the tiny
stand-ins of what those commands expect on a user's machine (CIFAR-100's files, ~/imagenet, torchvision's
downloaded weights, a ViT-S state_dict file), made in a scratch folder, never in the repository."""
import os
import pickle
import re
import socket
import subprocess
from pathlib import Path

import numpy as np

from conftest import ROOT, make_imagenet_folder

# README sections whose indented (4-space) code blocks are command blocks.
SECTIONS = ("Setup, the three commands, tests", "ImageNet and 224 px: the papers' settings", "Multi-GPU: torchrun")


def strip_comment(line):
    """`line` without a trailing shell comment: a `#` at a word start outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_blocks(text, sections=SECTIONS):
    """[(section, [lines of one indented code block, dedented])] for the blocks of `sections`, in order."""
    blocks, section, lines = [], None, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if section in sections and line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            blocks.append((section, block))
            continue
        i += 1
    found = {s for s, _ in blocks}
    missing = [s for s in sections if s not in found]
    assert not missing, f"README.md has no command block in the section(s) {missing}"
    return blocks


def logical_lines(block):
    """The block's command lines: `\\` continuations joined, trailing comments and blank lines left out."""
    commands, pending = [], ""
    for raw in block:
        line = strip_comment(raw)
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = (pending + line.strip()).strip()
        pending = ""
        if line:
            commands.append(" ".join(line.split()))
    assert not pending, f"a README command ends with a continuation: {pending!r}"
    return commands


ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def shell_words(assignments, command, env=None):
    """argv of `command` as bash splits and expands it after `assignments` (HOME, ~ and $VARS included)."""
    script = "\n".join(assignments) + f'\nset -- {command}\nprintf "%s\\0" "$@"'
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True,
                         env=env).stdout
    return out.split("\0")[:-1]


def flag_value(argv, flag, default=None):
    """The last value of `flag` in argv (argparse's rule), `default` if absent."""
    value = default
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value = argv[i + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ stand-ins

def make_cifar100(data_dir, train=8, test=4):
    """data_dir/cifar-100-python/{train,test,meta} as torchvision.datasets.CIFAR100 reads them: `train` and
    `test` images (N, 3072) uint8, labels 0, 1, 2, ..., the 100 class names in meta. Their md5 are not
    torchvision's: the subprocesses run with `lenient_cifar_site`."""
    folder = Path(data_dir) / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", train), ("test", test)):
        entry = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 "fine_labels": [i % 100 for i in range(n)], "coarse_labels": [i % 20 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": [f"class{i:03d}" for i in range(100)],
            "coarse_label_names": [f"super{i:02d}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))


SITECUSTOMIZE = '''"""Test stand-in only (tests/test_readme_commands.py): torchvision's CIFAR md5 checks pass, patched
once torchvision.datasets.cifar is imported (not before: most processes never import torchvision)."""
import importlib.abc
import sys

TARGET = "torchvision.datasets.cifar"


class LenientCifar(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        import importlib.machinery
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            module.check_integrity = lambda *args, **kwargs: True
            module.CIFAR10._check_integrity = lambda self: True

        spec.loader.exec_module = patched
        return spec


sys.meta_path.insert(0, LenientCifar())
'''


def lenient_cifar_site(folder):
    """A folder for PYTHONPATH whose sitecustomize.py switches torchvision's CIFAR integrity check off."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def make_weights(commands, torch_home, cwd):
    """Random-init stand-ins of the weights the commands (argv lists) load: torchvision's `--teacher tv_X
    --teacher-weights W` and `--model tv_X --pretrained [W]` at $TORCH_HOME/hub/checkpoints/<the url's file>,
    and a `--pretrained FILE.pth` (1000-class state_dict of --model) at FILE. Returns the files made."""
    import torch
    import torchvision

    import models

    made = {}
    for argv in commands:
        pairs = [(flag_value(argv, "--teacher"), flag_value(argv, "--teacher-weights"))]
        if "--pretrained" in argv:
            i = argv.index("--pretrained")
            given = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else "IMAGENET1K_V1"
            pairs.append((flag_value(argv, "--model"), given))
        for name, weights in pairs:
            if not name or not weights:
                continue
            if name.startswith("tv_") and not weights.endswith((".pth", ".pt")):
                source = name[len("tv_"):]
                url = torchvision.models.get_model_weights(source)[weights].url
                path = Path(torch_home) / "hub" / "checkpoints" / Path(url).name
                make = lambda source=source: torchvision.models.get_model(source, weights=None).state_dict()
            elif weights.endswith((".pth", ".pt")):
                path = Path(cwd) / Path(weights).expanduser()
                make = lambda name=name: models.create_model(name, 1000).state_dict()
            else:  # a teacher found by a file's name in the cache: made by an earlier command, not here
                continue
            if path not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.manual_seed(0)
                torch.save(make(), path)
                made[path] = name
    return made


def make_workdir(root):
    """root/home (HOME, with ~/imagenet), root/torch (TORCH_HOME), root/site (sitecustomize), root/work (the
    commands' working directory: the scripts and models/ as links to the repository's, data/ with CIFAR-100).
    Returns {name: path}."""
    root = Path(root)
    dirs = {name: root / name for name in ("home", "torch", "site", "work")}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    make_imagenet_folder(dirs["home"] / "imagenet", 2, 1,
                         classes=("n01440764", "n01443537", "n01484850", "n01491361"))
    for path in [*ROOT.glob("*.py"), ROOT / "models"]:
        (dirs["work"] / path.name).symlink_to(path)
    make_cifar100(dirs["work"] / "data")
    lenient_cifar_site(dirs["site"])
    return dirs


def environment(dirs, venv_bin):
    """The commands' environment: the venv's python and torchrun first on PATH, the scratch HOME and
    TORCH_HOME, the lenient CIFAR check, CPU only (gloo under torchrun, as the test suite runs), one thread
    per process (2-core CI), no bytecode written into the repository."""
    launched = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items()
           if k not in launched and not k.startswith(("PET_", "TORCHELASTIC_", "MASTER_"))}
    env.update(CUDA_VISIBLE_DEVICES="", PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", HOME=str(dirs["home"]),
               TORCH_HOME=str(dirs["torch"]), PYTHONPATH=str(dirs["site"]), OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env

"""README.md's commands, run as written, so that a README command that fails makes CI fail.

The command lines are read from README.md at test time: every line of the indented code blocks of the sections
in readme_standins.SECTIONS (`\\` continuations joined, trailing comments left out). Each is classified: a
shell variable assignment (`I="..."`, run before the later commands, as in the user's shell), a command run
(`python X.py ...`, `torchrun ... X.py ...`), or a skipped pattern of SKIPPED with its reason; any other line
fails its test, so that a new README command is not silently left out.

The commands run in README order through `bash -c`, one after another in ONE scratch working directory (a
teacher trained or fine-tuned by one command is found cached by the next, as for a user; nothing is cached
before the first; the earlier commands' run folders are moved aside, see readme_runs), with the venv's python
and torchrun first on PATH, HOME and TORCH_HOME in scratch folders holding the stand-ins (readme_standins.py:
~/imagenet with 4 classes of 2 training and 1 validation image, CIFAR-100's files with 8 training and 4 test
images, random-init weights where torchvision's weights API and `--pretrained FILE` read them). What
is changed in a command: `--nproc_per_node N` becomes 2 (gloo on CPU), and the flags of SHRINK are appended
(argparse takes a repeated flag's last value). torchrun's port is a free one, through its PET_MASTER_PORT
environment variable (the default of --master-port), not the command.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import readme_standins as standins
import shlex
from models import FIXED_224
from conftest import ROOT

pytestmark = pytest.mark.slow  # ~35 processes, each importing torch: CI runs it beside the default suite

VENV_BIN = Path(sys.executable).parent  # the environment running the tests: its python and torchrun
RANKS = 2
TIMEOUT_S = 600  # per command: a hang fails its test instead of CI's whole job

METHOD_SCRIPTS = ("blockwise_kd.py", "sskd.py", "lfcc.py")

# Lines that are not run, each with why (a regular expression searched in the line as written).
SKIPPED = (
    (r"^python3 -m venv |^pip install ",
     "setup: makes a virtual environment and installs packages from the network; the tests run in one"),
    (r"^python -m pytest ", "the test suite itself, which CI runs; run from a test it would recurse"),
    (r"--nnodes [2-9].* --rdzv-endpoint HOST:",
     ("a template for a second machine (HOST, `...` for the flags), not a runnable line; run as two local "
      "'nodes' it would cost two more torchrun launches for little: the scripts under torchrun are the lines "
      "above it")),
)
RUN = re.compile(r"^(python|torchrun(\s+-{1,2}\S+(\s+[^-\s]\S*)?)*)\s+\w+\.py(\s|$)")


def script_of(argv):
    return next((Path(w).name for w in argv if w.endswith(".py")), None)


def at_224_or_imagenet(argv):
    return standins.flag_value(argv, "--dataset") == "imagenet" or standins.flag_value(argv, "--image-size") == "224"


# Flags appended to the commands they match (all that match, in this order): (what, applies to argv, flags, why).
SHRINK = (
    ("method scripts", lambda argv: script_of(argv) in METHOD_SCRIPTS, ["--epochs", "1", "--teacher-epochs", "1"],
     ("240 epochs of student and teacher (30 for a fine-tuned teacher) -> 1; the teacher a command trains or "
      "fine-tunes is cached as ..._1ep.pth and found by the later commands that use it")),
    ("common.py", lambda argv: script_of(argv) == "common.py", ["--epochs", "1"],
     "30 epochs -> 1: saved as the _1ep teacher that the next command's --teacher-epochs 1 finds"),
    ("--dataset imagenet", lambda argv: standins.flag_value(argv, "--dataset") == "imagenet", ["--workers", "0"],
     "the streamed pipeline decoding in the training process: no decoding processes to start on 2 cores"),
    ("224 px, models that take other sizes",
     lambda argv: at_224_or_imagenet(argv) and not any(w in FIXED_224 for w in argv), ["--image-size", "64"],
     "ResNets, MobileNetV1, Swin-T at 64 px (12x less compute); the DeiTs take 224 only and stay there"),
)


def classify(line):
    """('assign' | 'run' | 'skip' | 'unknown', the reason of a skip)."""
    if standins.ASSIGNMENT.match(line) and " " not in line.split("=", 1)[0]:
        return "assign", None
    for pattern, reason in SKIPPED:
        if re.search(pattern, line):
            return "skip", reason
    if RUN.match(line):
        return "run", None
    return "unknown", None


def readme_lines():
    """[(section, line, kind, reason)] of every command line of README.md's command blocks, in order."""
    lines = []
    for section, block in standins.readme_blocks((ROOT / "README.md").read_text(encoding="utf-8")):
        for line in standins.logical_lines(block):
            lines.append((section, line, *classify(line)))
    return lines


def as_run(line, argv):
    """The line with its process count brought to RANKS and the SHRINK flags of its argv appended."""
    line = re.sub(r"(--nproc[_-]per[_-]node[ =])\d+", rf"\g<1>{RANKS}", line)
    extra = [flag for _, applies, flags, _ in SHRINK if applies(argv) for flag in flags]
    return " ".join([line, *map(shlex.quote, extra)])


def key_lines(output):
    """The lines that say why a command failed: `error:` lines and the last line of every traceback (the
    ranks' too), torchrun's own ChildFailedError left out."""
    found = []
    prefixed = [(m.group(1) if m else "", line[m.end() if m else 0:])  # torchrun's ranks: "[rank1]: ..."
                for line in output.splitlines() for m in [re.match(r"(\[rank\d+\]): ?", line)]]
    for i, (rank, line) in enumerate(prefixed):
        if line.startswith("error:"):
            found.append(f"{rank} {line}".strip())
        elif line.startswith("Traceback (most recent call last):"):
            end = next((text for r, text in prefixed[i + 1:] if r == rank and text and not text[0].isspace()), None)
            if end and "ChildFailedError" not in end:
                found.append(f"{rank} {end}".strip())
    return found


def tail(output, n=40):
    """The last n lines of the output, without torchrun's traceback and failure table (its ranks' exit codes
    are in its `failed (exitcode: ...)` line above them)."""
    lines = output.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("Traceback (most recent call last):") and 'bin/torchrun"' in lines[i + 1]:
            lines = lines[:i] + ["(torchrun's traceback and failure table left out)"]
            break
    return "\n".join(lines[-n:])


def run_line(script, cwd, env, log_file):
    """bash -c script in cwd, output to log_file; (exit code, seconds). A run past TIMEOUT_S is killed with
    its whole process group (torchrun's ranks too) and reads as exit code 124."""
    start = time.perf_counter()
    with open(log_file, "wb") as log:
        process = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = 124
    return code, time.perf_counter() - start


LINES = readme_lines()
COMMANDS = [(i, line) for i, (_, line, kind, _) in enumerate(LINES) if kind != "assign"]


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """Every 'run' line of README.md run in order in one scratch folder: {line index: result dict}."""
    dirs = standins.make_workdir(tmp_path_factory.mktemp("readme"))
    env = standins.environment(dirs, VENV_BIN)
    assignments, planned = [], []
    for i, (_, line, kind, _) in enumerate(LINES):
        if kind == "assign":
            assignments.append(line)
        elif kind == "run":
            argv = standins.shell_words(assignments, line, env)
            planned.append((i, list(assignments), as_run(line, argv), argv))
    standins.make_weights([argv for *_, argv in planned], dirs["torch"], dirs["work"])
    results = {}
    for i, assigned, command, argv in planned:
        log_file = dirs["work"].parent / f"command{i:02d}.log"
        # Each command starts without the earlier ones' run folders (runs/ moved aside; the teacher cache,
        # checkpoints/, stays): the Multi-GPU section's single-node line is the Setup section's first command
        # again, under torchrun, and its default --out-dir would hold that run already, which a fresh run
        # refuses by design (README "Reliability"). A user runs one or the other; each must work.
        if (dirs["work"] / "runs").exists():
            (dirs["work"] / "runs").rename(dirs["work"].parent / f"runs-before-command{i:02d}")
        port_env = {**env, "PET_MASTER_PORT": str(standins.free_port())}
        code, seconds = run_line("\n".join([*assigned, command]), dirs["work"], port_env, log_file)
        output = log_file.read_text(errors="replace")
        results[i] = {"command": command, "assignments": assigned, "code": code, "seconds": seconds,
                      "output": output}
        why = "" if code == 0 else " | ".join(key_lines(output)[-2:])
        print(f"README command {i:02d}: exit {code}, {seconds:.1f} s: {command}" + (f"\n    {why}" if why else ""))
    yield results
    # About 3 GB of weights, teachers and runs: removed, the commands' logs (commandNN.log) kept.
    for folder in dirs.values():
        shutil.rmtree(folder, ignore_errors=True)
    for folder in dirs["work"].parent.glob("runs-before-command*"):
        shutil.rmtree(folder, ignore_errors=True)


def command_id(item):
    i, line = item
    return f"{i:02d}-" + "-".join([w for w in line.split() if re.fullmatch(r"[A-Za-z][\w.]*", w)][:5])


@pytest.mark.parametrize("item", COMMANDS, ids=command_id)
def test_readme_command(item, request):
    i, line = item
    section, _, kind, reason = LINES[i]
    if kind == "skip":
        pytest.skip(f"not run ({reason})")
    assert kind == "run", (f"README.md ({section}) has a command line that this test neither runs nor skips: "
                           f"{line!r}; add it to RUN's pattern or to SKIPPED with the reason")
    result = request.getfixturevalue("readme_runs")[i]  # all the commands, run once, at the first one
    assert result["code"] == 0, (
        f"README.md ({section}) command failed with exit code {result['code']} after {result['seconds']:.0f} s, "
        f"run as\n    {result['command']}\nafter\n    " + "\n    ".join(result["assignments"] or ["(nothing)"])
        + "\nwhy: " + (" | ".join(key_lines(result["output"])) or "(no error line)")
        + f"\nlast lines of its output:\n{tail(result['output'])}")


def test_the_readme_has_commands_to_run():
    """The parsing found the README's commands: the three scripts in each section and torchrun lines."""
    run = [line for _, line, kind, _ in LINES if kind == "run"]
    sections = {section for section, _, kind, _ in LINES if kind == "run"}
    assert sections == set(standins.SECTIONS)
    assert {script_of(line.split()) for line in run} >= {"blockwise_kd.py", "sskd.py", "lfcc.py", "common.py"}
    assert any(line.startswith("torchrun ") for line in run) and any(line.startswith("python ") for line in run)

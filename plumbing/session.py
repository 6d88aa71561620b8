"""What this process holds for the run it runs (`session`), the log line, and where a run stands."""
import os
import shlex
import sys
import time
from pathlib import Path

from plumbing.distributed import rank, world_size


class Session:
    """What this process holds for its run, in one object: its run folder's log.txt (each printed line after
    its date and time; lines printed before the folder is claimed are kept for it), the newest checkpoint it
    wrote (for the stop lines), and the OS locks it holds until it exits (run folders; teacher entries while
    it makes them). `start` begins the next run in this process (the tests run many); the locks stay."""

    def __init__(self):
        self.folder_locks, self.teacher_claims = {}, {}  # resolved path -> FileLock (plumbing.files)
        self.file = None
        self.start()

    def start(self):
        if self.file:
            self.file.close()
        self.file, self.pending, self.folder, self.checkpoint = None, [], None, {}

    def open_log(self, path):
        """Append from now on to `path`, the log file of the run folder this run claimed."""
        pending, self.folder = self.pending, Path(path).parent
        self.file, self.pending = open(path, "a", encoding="utf-8"), []
        self.file.write("".join(pending))
        self.file.flush()

    def write(self, message):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = "".join(f"{stamp} {line}\n" for line in str(message).splitlines() or [""])
        if self.file is None:
            self.pending.append(lines)
            return
        try:
            self.file.write(lines)
            self.file.flush()
        except OSError:  # a full disk stops the run where it writes its results, not here
            pass

    def saved(self, path, epoch, epochs):
        """A complete checkpoint of epoch/epochs is at `path`."""
        self.checkpoint = {"path": path, "epoch": epoch, "epochs": epochs}


session = Session()


def log(message):
    """Print a line of the run (under torchrun, rank 0 speaks for all) and keep it in the run's log.txt."""
    if rank() == 0:
        print(message, flush=True)
        session.write(message)


def command_line(extra=()):
    """The command that started this process, shell-quoted, with `extra` arguments appended (under torchrun,
    a torchrun command with the same number of processes per node)."""
    launcher = ["python"]
    if world_size() > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        nodes = world_size() // per_node
        launcher = ["torchrun", f"--nproc_per_node={per_node}"] + ([f"--nnodes={nodes}"] if nodes > 1 else [])
    return " ".join(shlex.quote(a) for a in [*launcher, *sys.argv, *extra])


def resume_command(extra=()):
    """This command with --resume (and `extra`), and the run folder named when it was the default one, whose
    name depends on the data's fingerprint (a data change would otherwise start a new run elsewhere)."""
    extra = [flag for flag in ["--resume", *extra] if flag not in sys.argv]
    if session.folder and "--out-dir" not in sys.argv:
        extra = ["--out-dir", str(session.folder), *extra]
    return command_line(extra)


def where_the_run_stands(file_to_fix=False):
    """For a stop message: the newest complete checkpoint of this run and the command that resumes it (with
    file_to_fix, once an unreadable file is replaced or deleted: --allow-data-change)."""
    checkpoint = session.checkpoint
    if checkpoint:
        where = (f"the last complete checkpoint is {checkpoint['path']} (epoch {checkpoint['epoch']}/"
                 f"{checkpoint['epochs']})")
    else:
        where = "no checkpoint was saved yet"
    if file_to_fix:
        return f"{where[0].upper()}{where[1:]}; replace the file or delete it, then go on with: " \
               f"{resume_command(['--allow-data-change'])}"
    return f"{where}; to resume: {resume_command()}"

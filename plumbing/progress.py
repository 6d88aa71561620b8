"""Progress and stop lines: the first line of a fit, the progress and epoch lines with speed and ETA, and
run_main, which ends every stop (NaN, Ctrl-C, SIGTERM, an unreadable file, a lost rank or worker, a refusal)
in one line with the command that resumes."""
import contextlib
import io
import signal
import sys
import time

import torch
import torch.distributed as dist

from plumbing.datasets import UnreadableFile
from plumbing.distributed import rank, world_size
from plumbing.session import log, session, where_the_run_stands


def log_start(title, recipe, steps_per_epoch, model, train_modules, device, fast_paths):
    """The first line of a fit: what it trains (the model's parameters, and those that train where they
    differ: an SSKD phase's stage, a method's connectors), how, and the fast paths (their description)."""
    plan = f"{recipe['epochs']} epochs x {steps_per_epoch} steps, batch {recipe['batch_size']}"
    ranks = f" x {world_size()} ranks ({dist.get_backend()})" if world_size() > 1 else ""
    total = sum(p.numel() for p in model.parameters())
    trained = {id(p): p.numel() for m in train_modules for p in m.parameters() if p.requires_grad}
    trained = sum(trained.values())  # each parameter once
    params = f"{total:,} params" + (f", {trained:,} trained" if trained != total else "")
    log(f"{title}: {plan}, {recipe['optimizer']} lr {recipe['lr']}, {params}, device {device}{ranks}; "
        f"{fast_paths}")


class ProgressLine:
    """Within an epoch, a line with loss, speed and ETA every `log_every` seconds (not after the last
    step)."""

    def __init__(self, epoch, recipe, steps_per_epoch, log_every, checkpoint_path):
        self.epoch, self.recipe, self.steps, self.log_every = epoch, recipe, steps_per_epoch, log_every
        self.checkpoint_path = checkpoint_path
        self.start = self.last_print = time.time()

    def maybe_log(self, step, loss_sum, seen, images_done):
        """loss_sum and seen: this rank's, for the mean loss so far; images_done: the images of all ranks so
        far (the global batches done), so that speed and ETA are the run's, not one rank's."""
        if time.time() - self.last_print <= self.log_every or step + 1 >= self.steps:
            return
        self.last_print = time.time()
        mean_loss = loss_sum / seen
        check_finite(mean_loss, self.epoch, self.checkpoint_path, self.recipe)
        speed = images_done / (self.last_print - self.start)
        epoch_seconds = self.steps * self.recipe["batch_size"] / speed
        eta = epoch_seconds * (self.recipe["epochs"] - self.epoch) - (self.last_print - self.start)
        log(f"  epoch {self.epoch + 1} step {step + 1}/{self.steps} loss {mean_loss.item():.4f} "
            f"{speed:.0f} img/s ETA {format_seconds(eta)} (training only)")


def log_epoch(row, epochs, history):
    """The line of an ended epoch: its metrics, lr, speed, time, and the ETA of the run."""
    eta = (epochs - row["epoch"]) * sum(h["seconds"] for h in history) / len(history)
    not_shown = ("epoch", "lr", "images_per_sec", "seconds")
    shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in not_shown)
    log(f"epoch {row['epoch']}/{epochs} {shown} lr {row['lr']:.4g} {row['images_per_sec']:.0f} img/s "
        f"{row['seconds']:.1f}s ETA {format_seconds(eta)}")


def format_seconds(s):
    if s >= 3600:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def check_finite(loss_sum, epoch, checkpoint_path, recipe):
    if not torch.isfinite(loss_sum):
        kept = (f"the last good checkpoint {checkpoint_path} is intact" if checkpoint_path.exists()
                else "no checkpoint was written")
        raise FloatingPointError(
            f"the training loss became NaN/inf in epoch {epoch + 1}; stopped ({kept}). Start afresh with a "
            f"lower --lr (this run's is {recipe['lr']:g}) or lower loss weights, adding --overwrite (or "
            "another --out-dir): --resume continues only with the same flags, and would repeat it")


class Terminated(KeyboardInterrupt):
    """SIGTERM, what cluster schedulers send before they pre-empt a job: stops a run as Ctrl-C does."""


def raise_terminated(signum, frame):
    raise Terminated


def stopped_from_outside(error):
    """What a RuntimeError that another process caused says, in a few words, or None for any other (a bug,
    whose traceback is wanted): a decoding worker killed (the out-of-memory killer, a signal), or under
    torchrun another rank gone, which its own traceback or torchrun's report explains."""
    text = " ".join(str(error).split())
    if "DataLoader worker" in text:
        return f"a decoding worker process stopped ({text[:120]}; the out-of-memory killer, or a signal)"
    lost = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL")
    distributed_error = isinstance(error, getattr(dist, "DistError", ())) or any(s in text for s in lost)
    if world_size() > 1 and distributed_error:
        return "another process of this torchrun job stopped (the collective operation failed)"
    return None


def run_main(main):
    """A NaN stop, Ctrl-C, SIGTERM, a lost rank or decoding worker end in one clear line with the exact
    command that resumes (exit code 1, 130 or 143), not a traceback. Under torchrun every rank stops with
    the same exit code and only rank 0 prints (the others' argparse and warning output is dropped, not
    their tracebacks); the process group is left on every exit."""
    previous_handler = signal.signal(signal.SIGTERM, raise_terminated)
    quiet = contextlib.redirect_stderr(io.StringIO()) if rank() != 0 else contextlib.nullcontext()
    try:
        with quiet:
            main()
    except FloatingPointError as error:
        log(f"error: {error}")
        sys.exit(1)
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        log(f"interrupted{' (SIGTERM)' if terminated else ''}: {where_the_run_stands()}")
        sys.exit(143 if terminated else 130)
    except UnreadableFile as error:  # said by the rank that read the file (under torchrun, not always 0)
        print(f"error: cannot read {error}: a run does not skip images. {where_the_run_stands(True)}",
              flush=True)
        session.write(f"error: cannot read {error}")
        sys.exit(1)
    except RuntimeError as error:
        cause = stopped_from_outside(error)
        if cause is None:  # a bug: its traceback is wanted
            raise
        log(f"error: {cause}; {where_the_run_stands()}")
        sys.exit(1)
    except SystemExit as stop:
        if rank() != 0 and isinstance(stop.code, str):
            sys.exit(1)  # rank 0 prints the line
        if isinstance(stop.code, str):
            session.write(stop.code)
        raise
    finally:
        session.start()  # closes the run's log
        signal.signal(signal.SIGTERM, previous_handler)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

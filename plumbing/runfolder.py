"""Run folders: what fit writes in one (checkpoint.pt and metrics.jsonl every epoch, model.pth and
summary.json at the end), how a run claims its folder (locked; a fresh run never over another, a resume only
of the same run, named differences otherwise; the data changes a run accepts), and what a folder holds."""
import itertools
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from models import classifier
from plumbing.distributed import rank, world_size
from plumbing.files import ensure_writable, load_checkpoint, lock_dir, save_atomic, save_json, write_atomic
from plumbing.identity import (DATA_ENTRY, data_record, differences, flag_entries, identity_entries,
                               same_data, training_config)
from plumbing.progress import format_seconds
from plumbing.session import command_line, log, session


RUN_FILE = "run.json"
RUN_LOG = "log.txt"  # what the run printed, each line with its time
RUN_TEACHER = "teacher.pth"  # the run's own copy of its teacher's file (plumbing.weights.keep_teacher_copy)
RUN_OUTPUTS = ("checkpoint.pt", "metrics.jsonl", "summary.json", "model.pth")  # what fit writes in a folder


class RunFolder:
    """fit's files in its run folder: locked while it trains; resumed only from a checkpoint of the same
    training (`identity`, see run_identity); checkpoint.pt, then metrics.jsonl, after every epoch; model.pth
    and summary.json at the end. Every file goes through write_atomic."""

    def __init__(self, out_dir, identity, accepted_data=None):
        self.out_dir, self.identity = Path(out_dir), identity
        self.accepted_data = set(accepted_data or [identity["data"]])  # see claim_out_dir
        if rank() == 0:  # the only writer under torchrun
            ensure_writable(self.out_dir, "the run folder")
            lock_dir(self.out_dir, "the run folder")  # a teacher's run in checkpoints/ (a script's is locked)
        self.checkpoint, self.metrics = self.out_dir / "checkpoint.pt", self.out_dir / "metrics.jsonl"
        self.started = time.time()
        self.world_sizes = {}  # {world size: epochs trained at it}, over the resumes of the run

    def start(self, model, train_modules, optimizer, resume, device):
        """The history of the epochs already trained: the checkpoint's, loaded into the model, train modules
        and optimizer, with `resume` (after checking that it is of this training); [] otherwise."""
        history = []
        results = list(itertools.islice(run_results(self.out_dir), 4)) if resume else []
        if results and not self.checkpoint.exists():  # a finished run whose checkpoint was deleted
            raise SystemExit(f"error: cannot resume {self.out_dir}: it holds results "
                             f"({', '.join(map(str, results))}) but no checkpoint.pt to continue from; "
                             "nothing was changed. Train it afresh with --overwrite, or choose another "
                             "--out-dir")
        if resume and self.checkpoint.exists():
            state = load_checkpoint(self.checkpoint, device)
            saved = same_data(identity_entries(state.get("identity", {})), self.accepted_data, self.identity)
            found = differences(saved, identity_entries(self.identity), "the checkpoint")
            if found:
                raise SystemExit(f"error: {self.checkpoint} is from another training run "
                                 f"({'; '.join(found)}); nothing was changed. Delete its folder to train "
                                 "afresh, or choose another folder")
            model.load_state_dict(state["model"])
            for module, module_state in zip(train_modules, state["train_modules"]):
                module.load_state_dict(module_state)
            optimizer.load_state_dict(state["optimizer"])
            history = state["history"]
            self.world_sizes = state.get("world_sizes", {"not recorded": len(history)})
            epochs = self.identity["recipe"]["epochs"]
            session.saved(self.checkpoint, len(history), epochs)
            finished = " (finished: no epoch left to train)" if len(history) == epochs else ""
            log(f"resumed {self.out_dir} at epoch {len(history)}/{epochs}{finished}")
            write_metrics(self.metrics, history)  # from the checkpoint's history: no epoch twice
        return history

    def save_epoch(self, model, train_modules, optimizer, history, epochs, new_epoch=True):
        if new_epoch:
            self.world_sizes[str(world_size())] = self.world_sizes.get(str(world_size()), 0) + 1
        state = {"model": model.state_dict(), "train_modules": [m.state_dict() for m in train_modules],
                 "optimizer": optimizer.state_dict(), "epoch": len(history), "history": history,
                 "identity": self.identity, "world_sizes": self.world_sizes}
        save_atomic(state, self.checkpoint)
        session.saved(self.checkpoint, len(history), epochs)  # at once: a stop from here on names it
        write_metrics(self.metrics, history)  # after the checkpoint, from which a resume rewrites it

    def finish(self, model, data, recipe, history, fast, fields):
        """model.pth (when the last epoch was evaluated) and summary.json; returns the summary."""
        last = history[-1] if history else {}
        if "test_acc" in last:
            final_model = model_file(model, recipe["epochs"], last["test_acc"], data)
            save_atomic(final_model, self.out_dir / "model.pth")
        evaluated = [h for h in history if "test_acc" in h]
        best = max(evaluated, key=lambda h: h["test_acc"]) if evaluated else {}  # the first of equals
        summary = {"last_acc": last.get("test_acc"), "best_acc": best.get("test_acc"),
                   "best_epoch": best.get("epoch"), "last_top5": last.get("test_top5"),
                   "epochs": recipe["epochs"], "params": sum(p.numel() for p in model.parameters()),
                   "seconds": sum(h["seconds"] for h in history),
                   "mean_images_per_sec": sum(h["images_per_sec"] for h in history) / max(1, len(history)),
                   "evaluated_epochs": [h["epoch"] for h in evaluated], "last_epoch": last, "recipe": recipe,
                   "fast_paths": vars(fast), "data": data.fingerprint, "threads": torch.get_num_threads(),
                   "world_size": world_size(), "world_sizes": self.world_sizes,
                   "backend": dist.get_backend() if world_size() > 1 else None,
                   **fields}
        save_json(summary, self.out_dir / "summary.json")
        took = format_seconds(time.time() - self.started)
        if evaluated:
            top5 = f", top-5 {last['test_top5']:.4g}" if "test_top5" in last else ""
            result = (f"last acc {summary['last_acc']:.4g}{top5}, best {summary['best_acc']:.4g} (epoch "
                      f"{summary['best_epoch']})")
        else:  # a fit whose eval_fn measures no accuracy (an SSKD stage phase): its own test metrics
            not_measured = ("epoch", "lr", "images_per_sec", "seconds")
            measured = {k: v for k, v in last.items() if k not in not_measured and not k.startswith("train")}
            result = "last " + ", ".join(f"{k} {v:.4g}" for k, v in measured.items())
        log(f"done in {took}: {result} -> {self.out_dir}")
        return summary


def write_metrics(path, history):
    """metrics.jsonl, one JSON object per epoch, rewritten whole (atomically) after every epoch."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in history).encode())


def model_file(model, epoch, accuracy, data):
    """The benchmark's checkpoint format, plus the architecture name, class count and the fingerprint of the
    data it was trained on, for safer loading."""
    return {"model": model.state_dict(), "epoch": epoch, "accuracy": accuracy, "arch": model.arch,
            "num_classes": classifier(model).out_features, "data": data.fingerprint}


def read_run_file(out_dir):
    """run.json of a run folder, or None if there is none; a damaged one is one line naming it."""
    path = Path(out_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        valid = isinstance(record, dict) and isinstance(record.get("config"), dict) and "script" in record
    except (OSError, ValueError):  # a directory, unreadable, not UTF-8, not JSON
        valid = False
    if not valid:
        what = ("damaged or from an older version of this code (it must be a JSON object with 'script' and "
                "'config')")
        raise SystemExit(f"error: {path} is {what}, so which run {out_dir} holds cannot be checked; nothing "
                         "was changed. Start afresh with --overwrite, or choose another --out-dir")
    return record


def check_resume(out_dir, script, config, data_now=None, allow_data_change=False):
    """--resume continues only the run the folder holds: run.json and every checkpoint in the folder (an SSKD
    phase's too) must record this script, these training flags and this data; each difference is named.
    The data may differ with allow_data_change, within the bounds of data_change (files deleted or
    replaced). Returns (the folder's run.json record or None, the data fingerprints taken as this data)."""
    record = read_run_file(out_dir)
    refuse = ("; nothing was changed. Resume with the run's flags, start afresh with --overwrite, or choose "
              "another --out-dir")
    accepted = {config["data"]}  # this data, and what it was before changes the run accepted
    if record is not None:
        if record["script"] != script:
            raise SystemExit(f"error: cannot resume {out_dir}: it holds a run of {record['script']}.py, not "
                             f"of {script}.py; nothing was changed. Resume it with {record['script']}.py, or "
                             "choose another --out-dir")
        accepted |= {change["from"] for change in record.get("data_changes", [])}
        if record["config"].get("data") != config["data"] and allow_data_change:
            accepted.add(record["config"].get("data"))
            data_change(record, config, data_now)  # one line if it is too large
        found = differences(same_data(flag_entries(record["config"]), accepted, config), flag_entries(config),
                            "the run")
        if found:
            hint = ("; if image files were deleted or replaced since, add --allow-data-change"
                    if any(line.startswith(DATA_ENTRY) for line in found) else "")
            raise SystemExit(f"error: cannot resume {out_dir} with other training flags: "
                             f"{'; '.join(found)}{hint}{refuse}")
    checkpoints = sorted(out_dir.rglob("checkpoint.pt"))
    for path in checkpoints:  # read without loading the tensors (mmap)
        saved = identity_entries(load_checkpoint(path, mmap=True).get("identity", {}))
        found = differences(same_data(saved, accepted, config), flag_entries(config), "the checkpoint",
                            names=flag_entries(config))
        if found:
            raise SystemExit(f"error: cannot resume {out_dir}: {path} is from another training run "
                             f"({'; '.join(found)}){refuse}")
    results = list(itertools.islice(run_results(out_dir), 4))
    if not checkpoints and results:  # a finished run whose checkpoint was deleted is never trained again
        which = f"{RUN_FILE} names its run, but" if record is not None else f"neither {RUN_FILE} nor"
        raise SystemExit(f"error: cannot resume {out_dir}: it holds results ({', '.join(map(str, results))}) "
                         f"but {which} no checkpoint.pt to continue from{refuse}")
    return record, sorted(accepted)


def data_change(record, config, now):
    """--resume --allow-data-change: the run's data changed since it started (an unreadable image deleted or
    replaced, as the stop line advised): accepted where the classes are the same and each split lost or
    gained at most 1 % of its images (else one line), and recorded in run.json ('data_changes', and the new
    fingerprint and counts), which the record (updated here) is written to."""
    before = record.get("data_record") or {}
    too_large = [f"{key.replace('_', ' ')} {before[key]} -> {now[key]}" for key in ("classes", "class_names")
                 if key in before and before[key] != now[key]]
    for split in ("train_images", "test_images"):
        if split in before and abs(now[split] - before[split]) > max(1, before[split] // 100):
            too_large.append(f"{split.replace('_', ' ')} {before[split]} -> {now[split]}")
    if too_large:
        raise SystemExit(f"error: --allow-data-change accepts deleted or replaced files, not other data: "
                         f"{', '.join(too_large)}; nothing was changed. Resume with the run's data, or start "
                         "afresh with --overwrite")
    change = {"from": record["config"]["data"], "to": config["data"],
              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              **{f"{split} before": before.get(split) for split in ("train_images", "test_images")},
              **{split: now[split] for split in ("train_images", "test_images")}}
    record.setdefault("data_changes", []).append(change)
    record["config"]["data"], record["data_record"] = config["data"], now
    log(f"--allow-data-change: the data changed since the run started (fingerprint {change['from']} -> "
        f"{change['to']}; {change['train_images before']} -> {now['train_images']} training, "
        f"{change['test_images before']} -> {now['test_images']} test images); recorded in {RUN_FILE}")


def folder_contents(out_dir):
    """The files under a run folder that a fresh run must not start over, as paths relative to it (a
    generator: `--out-dir ~` is not walked to its end): every file but the lock files, run.json, the log, the
    teacher's copy and a metrics.jsonl of no epoch, all that a run that stopped before its first epoch ended
    leaves (a fresh run replaces them)."""
    out_dir = Path(out_dir)
    for top, dirs, names in os.walk(out_dir):
        dirs.sort()
        for name in sorted(names):
            path = Path(top) / name
            empty_metrics = name == "metrics.jsonl" and path.stat().st_size == 0
            trivial = name in (".lock", RUN_LOG) or empty_metrics or \
                (name in (RUN_FILE, RUN_TEACHER) and Path(top) == out_dir)
            if not trivial:
                yield path.relative_to(out_dir)


def run_results(out_dir):
    """What fit wrote under a run folder (RUN_OUTPUTS at any depth: an SSKD run's phases), as in
    folder_contents."""
    return (path for path in folder_contents(out_dir) if path.name in RUN_OUTPUTS)


def clear_run_folder(out_dir):
    """--overwrite: empty the run folder (its lock file aside) and say in one line what was removed. Only a
    folder that holds a run (run.json or what fit writes) is emptied: `--out-dir ~` is refused."""
    entries = sorted(p for p in out_dir.iterdir() if p.name != ".lock")
    if not entries:
        return
    if not any((out_dir / name).exists() for name in (RUN_FILE, RUN_LOG, *RUN_OUTPUTS)):
        found = ", ".join(p.name for p in entries[:4])
        raise SystemExit(f"error: --overwrite empties a run folder, but {out_dir} holds no run ({RUN_FILE}, "
                         f"{RUN_LOG}, {', '.join(RUN_OUTPUTS)}), only {found}: nothing was removed; choose "
                         "another --out-dir")
    names = ", ".join(p.name + "/" * p.is_dir() for p in entries[:8]) + (", ..." if len(entries) > 8 else "")
    files = 0
    try:
        for path in entries:
            if path.is_dir() and not path.is_symlink():
                files += sum(1 for p in path.rglob("*") if not p.is_dir())
                shutil.rmtree(path)
            else:
                files += 1
                path.unlink()
    except OSError as error:
        raise SystemExit(f"error: --overwrite cannot remove {error.filename or path} "
                         f"({error.strerror or error})") from None
    log(f"--overwrite: removed the earlier run from {out_dir} ({files} files: {names})")


def claim_out_dir(args, data, script):
    """Before anything is trained: the run folder is writable and locked; a fresh run does not start over an
    existing one (unless --overwrite, which empties it first); --resume continues only the run it holds (see
    check_resume). run.json records the script, the training flags, the data and the command. Returns the
    data fingerprints that the run takes as this data's (this one, and any it had before accepted changes)."""
    out_dir = Path(args.out_dir)
    ensure_writable(out_dir, "--out-dir")
    lock_dir(out_dir, "--out-dir")
    config = training_config(args, data)
    if args.overwrite:
        clear_run_folder(out_dir)
    results = list(itertools.islice(folder_contents(out_dir), 4))  # none: a fresh run may take its place
    if not args.resume and results:
        raise SystemExit(f"error: {out_dir} already holds a run ({', '.join(map(str, results))}); add "
                         "--resume to continue it, or choose another --out-dir (--overwrite replaces it)")
    record, accepted = check_resume(out_dir, script, config, data_record(data), args.allow_data_change) \
        if args.resume else (None, [config["data"]])
    if record is None:
        record = {"script": script, "config": config, "command": command_line(),
                  "data_record": data_record(data)}
    save_json(record, out_dir / RUN_FILE)  # (a resume rewrites it as it was, or with the data change)
    session.open_log(out_dir / RUN_LOG)
    session.write(f"$ {command_line()}")  # the log starts with the command (not printed: the user typed it)
    return accepted

"""argparse types: every number, seed, path and device flag checked as it is parsed, into argparse's one-line
error ('argument --lr: must be a positive number, not '0'')."""
import argparse
import math

import torch


def number(text, kind, is_valid, description):
    """`text` as int or float (`kind`), or argparse's one-line error 'argument --flag: must be ...'."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not is_valid(value):
        raise argparse.ArgumentTypeError(f"must be {description}, not {text!r}")
    return value


def positive_int(text):
    return number(text, int, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text):
    return number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text):
    return number(text, float, lambda v: v > 0, "a positive number")


def nonnegative_float(text):
    return number(text, float, lambda v: v >= 0, "a number >= 0")


MAX_SEED = 2 ** 32 - 1  # numpy's limit; train_batches' seed * 100_003 + epoch then fits torch's int64


def seed_int(text):
    return number(text, int, lambda v: 0 <= v <= MAX_SEED, f"an integer in 0..{MAX_SEED}")


def path_flag(text):
    """A path: any string but the empty one (`--out-dir ""` would silently mean the default folder)."""
    if not text:
        raise argparse.ArgumentTypeError("must be a path, not an empty string")
    return text


def fraction(text):
    return number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def area_fraction(text):
    return number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def device_name(text):
    """--device: a torch device that this machine has (cpu, cuda, cuda:N, mps)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not available: no CUDA device is visible; use "
                                             "--device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r} is not available: {count} CUDA device(s) are "
                                             f"visible, cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; use cuda, cuda:N or cpu")
    return text

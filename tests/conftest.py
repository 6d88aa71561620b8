import argparse
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

import common  # noqa: E402

torch.set_num_threads(2)


def make_args(*argv, method_args=None):
    """Parse the shared flags (plus a method's own `add_args`) as a script would."""
    parser = argparse.ArgumentParser()
    common.add_common_args(parser)
    common.add_distill_args(parser)
    if method_args:
        method_args(parser)
    return parser.parse_args([str(a) for a in argv])


def frozen(model):
    """A teacher as the methods expect it: eval mode, no trainable parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def synthetic_data():
    args = make_args("--dataset", "synthetic", "--train-subset", 640)
    return common.load_data(args, torch.device("cpu"))

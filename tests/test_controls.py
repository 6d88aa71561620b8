"""The mini-benchmark's CE + KD control (1 CE + 1 KD, T = 4) is one objective reachable from two scripts:
`blockwise_kd.py --stones none --gamma 0` and `lfcc.py --beta 0`. Both must give the same student update."""
import torch

import blockwise_kd as bkd
import common
import lfcc
import models
from conftest import frozen, make_args


def test_ce_kd_control_is_the_same_loss_and_gradient_in_blockkd_and_lfcc(synthetic_data):
    torch.manual_seed(0)
    teacher = frozen(models.create_model("resnet8", 10))
    student = models.create_model("resnet8", 10)
    x, y = next(synthetic_data.train_batches(16, seed=0, epoch=0))

    bkd_args = make_args("--stones", "none", "--gamma", 0, method_args=bkd.add_args)
    stones = bkd.SteppingStones(teacher, student, [])
    bkd_loss, _ = bkd.make_loss_fn(student, teacher, stones, bkd_args, ramp_epochs=0.0, label_smoothing=0.0)(x, y, 0.0)
    bkd_loss.backward()
    bkd_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)

    lfcc_args = make_args("--beta", 0, method_args=lfcc.add_args)
    low_pass = lfcc.make_filter(lfcc_args)
    space = lfcc.CompactSpace(lfcc.filtered_sizes(student, [1, 2, 3], low_pass),
                              lfcc.filtered_sizes(teacher, [1, 2, 3], low_pass), lfcc_args.proj_dim)
    recipe = common.make_recipe(lfcc_args, "cnn")
    lfcc_loss, terms = lfcc.make_loss_fn(lfcc_args, recipe, student, teacher, space, low_pass)(x, y, 0.0)
    lfcc_loss.backward()

    assert terms["lfcc"] > 1  # the contrastive term is computed, only weighted by 0
    assert torch.equal(lfcc_loss, bkd_loss)
    assert all(torch.equal(p.grad, g) for p, g in zip(student.parameters(), bkd_grads))

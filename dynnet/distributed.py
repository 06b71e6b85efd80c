"""Several processes training as one: full-batch gradients from their slices, and one decision to stop."""

import signal

import torch
from torch import Tensor


def sum_gradients(params: list[Tensor], stop_signal: int | None) -> int | None:
    """Make every process's gradient the full-batch one, and agree on whether to stop, in one all-reduce.

    The loss is a sum over slices, so gradients add. A parameter the drawn degree leaves out (the shared one at
    the lowest degree) has no gradient on any process, since all draw the same degree, and keeps none, so the
    optimizer skips it as in one process. The last element carries the signal numbers processes received.
    """
    grads = [p.grad for p in params if p.grad is not None]
    flag = torch.tensor(float(stop_signal or 0), dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.stack([*grads, flag])
    torch.distributed.all_reduce(flat)
    for grad, total in zip(grads, flat):
        grad.copy_(total)
    return agreed_stop(stop_signal, flat[-1])


def agreed_stop(own: int | None, received: Tensor) -> int | None:
    """The signal to stop with, given the sum of the signal numbers all processes received (0: none did). A
    process that got no signal itself stops as if terminated."""
    return (own or signal.SIGTERM) if received.item() > 0 else None

"""Where a process trains: the device, and its data-parallel group (accelerate, or a TA-EB branch's
torch.distributed group). Both expose the same small interface to the training loop."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import torch
import torch.nn as nn

from ..errors import ConfigError


def resolve_device(name: str) -> str:
    """`auto` -> cuda when a GPU is visible, else cpu; a CUDA device without a GPU stops with one line."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but no CUDA device is available (use cpu)")
    return name


class AccelerateDist:
    """accelerate places the process (CPU, one GPU, or a rank under accelerate launch / torchrun) and
    wraps DDP over the whole world. Precision and compilation are the TrainStep's, not accelerate's."""

    def __init__(self, device: str):
        from accelerate import Accelerator

        self.acc = Accelerator(cpu=device == "cpu", mixed_precision="no")
        self.device = self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """DDP over the world; one process trains the module itself: accelerate would keep every model it
        prepared (the dense model after its ticket, with the gradients a CUDA graph left on it) and may
        wrap its forward from accelerate's environment settings."""
        if self.world == 1:
            return model
        return self.acc.prepare_model(model)

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x, "mean")


class GroupDist:
    """Data parallelism inside one torch.distributed process group (a TA-EB region branch)."""

    def __init__(self, group, device: str):
        import torch.distributed as dist

        self.group, self._dist = group, dist
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device("cuda", local % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, process_group=self.group)

    def barrier(self) -> None:
        if self.world > 1:
            self._dist.barrier(group=self.group)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        y = x.clone()
        self._dist.all_reduce(y, group=self.group)
        return y / self.world


def make_dist(device: str, group=None):
    """The process's place: a TA-EB branch group when given, else whatever accelerate finds."""
    device = resolve_device(device)
    return GroupDist(group, device) if group is not None else AccelerateDist(device)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_requests(on_signal=None):
    """While inside: SIGINT, SIGTERM and SIGHUP are recorded in the yielded list (the loop saves a checkpoint
    and stops after the current iteration) instead of killing the process; on_signal(signum), when given,
    runs at once (the TA-EB launcher forwards the stop to its branches). Signal handlers live in the main
    thread only: elsewhere nothing is installed."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, _frame):
        got.append(signum)
        if on_signal is not None:
            on_signal(signum)

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)

"""One training step (forward, loss, backward, clip, optimizer, EMA) with the GPU fast path.

Shared by the trainer and `ebdiff bench`, so that the benchmark measures exactly what training
runs. The fast path is a set of switches, each with an `auto` default: on a GPU bf16 autocast,
channels_last, fused Adam, cuDNN autotuning and torch.compile (with CUDA graphs on one process); on
the CPU the plain fp32 eager path, which is also the one whose resume is bit-exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .diffusion import eps_loss
from .errors import ConfigError


@dataclass(frozen=True)
class FastPath:
    bf16: bool = False
    channels_last: bool = False
    compile: str = "none"
    fused_optimizer: bool = False
    cudnn_benchmark: bool = False

    def describe(self) -> str:
        parts = ["bf16" if self.bf16 else "fp32"]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile != "none":
            parts.append(f"compile={self.compile}")
        if self.fused_optimizer:
            parts.append("fused-adam")
        if self.cudnn_benchmark:
            parts.append("cudnn-benchmark")
        return " + ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


EAGER_FP32 = FastPath()  # the reference stack's mode


def resolve_fast_path(tcfg, device: torch.device, world: int = 1) -> FastPath:
    """Turn train.* 'auto' switches into concrete choices for this device."""
    cuda = device.type == "cuda"
    mp = tcfg.mixed_precision
    if mp == "auto":
        bf16 = cuda and torch.cuda.is_bf16_supported()
    elif mp == "bf16":
        bf16 = True
    elif mp == "no":
        bf16 = False
    else:
        raise ConfigError(f"train.mixed_precision={mp} is not supported (use auto, bf16 or no)")
    cl = tcfg.channels_last
    cl = cuda if cl == "auto" else bool(cl)
    comp = tcfg.compile
    if comp == "auto":
        comp = ("reduce-overhead" if world == 1 else "default") if cuda else "none"
    fused = tcfg.fused_optimizer
    fused = cuda if fused == "auto" else bool(fused)
    if fused and not cuda:
        raise ConfigError("train.fused_optimizer=true needs a CUDA device")
    bench = tcfg.cudnn_benchmark
    bench = cuda if bench == "auto" else bool(bench)
    return FastPath(bf16=bf16, channels_last=cl, compile=comp, fused_optimizer=fused, cudnn_benchmark=bench)


def make_optimizer(params, tcfg, fast: FastPath) -> torch.optim.Optimizer:
    kw = {"fused": True} if fast.fused_optimizer else {}
    return torch.optim.Adam(params, lr=tcfg.lr, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps,
                            weight_decay=tcfg.weight_decay, **kw)


def prepare_model(model: nn.Module, fast: FastPath) -> nn.Module:
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


class TrainStep:
    """step(x0, t, noise) -> detached loss. `model` may be DDP-wrapped; `raw` is the module itself."""

    def __init__(self, model: nn.Module, raw: nn.Module, opt: torch.optim.Optimizer, ema, sqrt_ab: torch.Tensor,
                 sqrt_1mab: torch.Tensor, loss_reduction: str, grad_clip: float, fast: FastPath,
                 weights: torch.Tensor | None = None):
        """weights: per-timestep loss weights on the device (Min-SNR, SpeeD), or None."""
        self.model, self.raw, self.opt, self.ema = model, raw, opt, ema
        self.weights = weights
        self.sqrt_ab, self.sqrt_1mab = sqrt_ab, sqrt_1mab
        self.reduction, self.grad_clip, self.fast = loss_reduction, grad_clip, fast
        self.params = [p for p in raw.parameters() if p.requires_grad]
        self.device_type = sqrt_ab.device.type
        if self.device_type == "cuda":  # a process-wide switch: each step sets the one its mode asks for
            torch.backends.cudnn.benchmark = fast.cudnn_benchmark
        fn = self._forward_loss
        if fast.compile != "none":
            fn = torch.compile(fn, mode=None if fast.compile == "default" else fast.compile)
        self.forward_loss = fn

    def _forward_loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        xt = self.sqrt_ab[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1mab[t].view(-1, 1, 1, 1) * noise
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.fast.bf16):
            pred = self.model(xt, t).sample
        return eps_loss(pred, noise, self.reduction, None if self.weights is None else self.weights[t])

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.fast.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)
        loss = self.forward_loss(x0, t, noise)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw)
        return loss.detach()

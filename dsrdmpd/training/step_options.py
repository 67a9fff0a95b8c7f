"""How one training step runs: precision, memory layout, the Adam implementation and the
CUDA-graph capture of the whole step (forward + backward + optimizer step).

Config keys (all under ``train``; the CPU default path is the plain float32 step of
earlier versions, bit for bit):

- ``precision``: ``fp32`` | ``tf32`` | ``bf16`` | null. A shorthand that sets
  ``tf32`` and ``mixed_precision`` (``bf16``: bfloat16 autocast, CUDA only). null: those
  two keys decide, as before.
- ``channels_last``: model and 4-D inputs stored NHWC (meant for cuDNN; allowed on CPU).
- ``fused_optimizer``: ``auto`` (fused Adam on CUDA, PyTorch's plain Adam on the CPU),
  true (fused wherever PyTorch has it, the CPU included) or false (PyTorch's default:
  the multi-tensor ``foreach`` form on CUDA).
- ``cuda_graph``: capture the step in a CUDA graph and replay it (Adam made
  ``capturable``, its learning rate a device tensor so a scheduler still reaches it).
  Refused on the CPU, with gradient accumulation, several processes, fp16 (the gradient
  scaler reads the gradients on the host) and gradient clipping.

Optimizer checkpoints are written in one portable form (learning rate a number, step
counts on the CPU) and read into whichever implementation this run uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterable, Optional, Tuple

import torch

from ..config import ConfigError
from ..cuda_graphs import record, warm_up

# param-group entries that choose Adam's implementation: this run's choice, never the file's
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")


@dataclass(frozen=True)
class StepOptions:
    channels_last: bool = False
    fused: Optional[bool] = None        # None: PyTorch's default implementation
    cuda_graph: bool = False


def apply_precision(tcfg: Dict[str, Any]) -> None:
    """Resolve ``train.precision`` (when set) into ``tf32`` and ``mixed_precision`` in place."""
    precision = tcfg.get("precision")
    if precision is None:
        return
    tcfg["mixed_precision"] = "bf16" if precision == "bf16" else "no"
    tcfg["tf32"] = precision != "fp32"


def resolve_step_options(tcfg: Dict[str, Any], device_type: str, processes: int = 1,
                         grad_accum: int = 1) -> StepOptions:
    """Check the step options against the device and the run; a ConfigError (one line
    naming the key) where they cannot work."""
    cuda = device_type == "cuda"
    if tcfg.get("precision") == "bf16" and not cuda:
        raise ConfigError(f"train.precision: bf16 autocast is for CUDA; this run is on the {device_type} "
                          f"(train.precision: fp32 there)")
    fused = tcfg.get("fused_optimizer", "auto")
    fused = (True if cuda else None) if fused == "auto" else (True if fused else None)
    graph = bool(tcfg.get("cuda_graph", False))
    if graph:
        reasons = [(not cuda, f"CUDA graphs need a CUDA device; this run is on the {device_type}"),
                   (grad_accum > 1, f"not with gradient accumulation (train.grad_accum {grad_accum})"),
                   (processes > 1, f"not with {processes} processes (capture one process's step)"),
                   (tcfg.get("mixed_precision") == "fp16",
                    "not with fp16 mixed precision (its gradient scaler checks the gradients on the host)"),
                   (bool(tcfg.get("grad_clip")), "not with train.grad_clip")]
        for refused, why in reasons:
            if refused:
                raise ConfigError(f"train.cuda_graph: {why}")
    return StepOptions(bool(tcfg.get("channels_last", False)), fused, graph)


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, options: StepOptions,
              device: torch.device, **kwargs) -> torch.optim.Adam:
    """Adam in the implementation ``options`` chooses; with no option set exactly
    ``torch.optim.Adam(params, lr=lr, **kwargs)``."""
    extra: Dict[str, Any] = {}
    if options.fused:
        extra["fused"] = True
    if options.cuda_graph:
        # a float learning rate would be baked into the graph: a device tensor is read at replay
        extra["capturable"] = True
        lr = torch.tensor(float(lr), device=device)
    return torch.optim.Adam(params, lr=lr, **kwargs, **extra)


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, torch.Tensor) else value


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with learning rates as numbers and step counts on the CPU,
    so that any Adam implementation on any device reads it (unchanged for plain CPU Adam)."""
    sd = optimizer.state_dict()
    groups = [{k: (_plain(v) if k in ("lr", "initial_lr") else v) for k, v in g.items()} for g in sd["param_groups"]]
    state = {i: {k: (v.detach().cpu() if k == "step" and isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for i, s in sd["state"].items()}
    return {"state": state, "param_groups": groups}


def set_group_lr(group: Dict[str, Any], lr: float) -> None:
    """Set a param group's learning rate to ``lr``; a tensor rate is filled in place (a
    captured CUDA-graph step reads its address)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Dict[str, Any]) -> None:
    """Load ``saved`` (any implementation's state dict) and keep this optimizer's own
    implementation: ``load_state_dict`` would take the file's fused / foreach / capturable
    flags, turning a CPU run fused after a GPU checkpoint or a captured run uncapturable."""
    kept = [({k: g[k] for k in IMPLEMENTATION_KEYS if k in g}, g["lr"]) for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, (flags, lr) in zip(optimizer.param_groups, kept):
        group.update(flags)
        saved_lr, group["lr"] = group["lr"], lr
        set_group_lr(group, _plain(saved_lr))
        on_device = bool(group.get("capturable") or group.get("fused"))
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)


def _input_key(tensors: Tuple[torch.Tensor, ...]) -> Hashable:
    return tuple((tuple(t.shape), t.stride(), t.dtype, str(t.device)) for t in tensors)


class GraphedTrainingStep:
    """``loss_fn(*inputs)``, its backward and ``optimizer.step()`` captured in one CUDA graph
    and replayed with new inputs (copied into static buffers). A new input shape recaptures
    (the old graph and its memory pool are dropped). The warm-up steps that capture needs
    (on a side stream, as in PyTorch's recipe) are undone: weights, buffers (BatchNorm's
    running statistics) and optimizer state are put back, so the first replay is the run's
    real step. The optimizer must be capturable."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, warmup: int = 3):
        if not all(g.get("capturable") for g in optimizer.param_groups):
            raise ValueError("GraphedTrainingStep needs an optimizer made with capturable=True")
        self.loss_fn, self.model, self.optimizer, self.warmup = loss_fn, model, optimizer, warmup
        self.graph = None
        self.key: Optional[Hashable] = None
        self.captures = 0

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """One training step; returns the loss (a copy)."""
        key = _input_key(inputs)
        if key != self.key:
            self._capture(inputs)
            self.key = key
        for buf, t in zip(self.static_inputs, inputs):
            buf.copy_(t)
        self.graph.replay()
        return self.static_loss.detach().clone()

    def _backward_and_step(self) -> torch.Tensor:
        """The step's work on the static inputs: the loss, its backward, the optimizer step."""
        loss = self.loss_fn(*self.static_inputs)
        loss.backward()
        self.optimizer.step()
        return loss

    def _step(self) -> None:
        """A whole eager step (the warm-up's): gradients cleared first."""
        self.optimizer.zero_grad(set_to_none=True)
        self._backward_and_step()

    def _tensors(self):
        """(weights and buffers, Adam's state tensors)"""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        state = [t for p in params for t in self.optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
        return params + list(self.model.buffers()), state

    def _capture(self, inputs: Tuple[torch.Tensor, ...]) -> None:
        self.graph = self.static_loss = None
        self.static_inputs = tuple(t.clone(memory_format=torch.preserve_format) for t in inputs)
        params, state = self._tensors()
        saved = [t.detach().clone() for t in params + state]
        had_state = set(map(id, state))
        warm_up(self._step, self.warmup)
        with torch.no_grad():                  # undo the warm-up: weights and Adam state as before it
            for t, s in zip(params + state, saved):
                t.copy_(s)
            for t in self._tensors()[1]:
                if id(t) not in had_state:     # state Adam created in the warm-up: fresh is all zeros
                    t.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph, self.static_loss = record(self._backward_and_step)
        self.captures += 1


def to_memory_format(tensors: Tuple[torch.Tensor, ...], channels_last: bool) -> Tuple[torch.Tensor, ...]:
    """4-D tensors in channels-last when asked (others unchanged)."""
    if not channels_last:
        return tensors
    return tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in tensors)

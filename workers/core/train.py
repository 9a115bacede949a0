"""The training loop: batches, augmentation, schedules, the method's loss, the optimizer, seconds
per epoch and a checkpoint after every epoch.

Reproducibility: every random draw (model init, batch order, augmentation, PGD starts) comes from
the seed, through one CPU `torch.Generator` and torch's global CPU RNG, and both are saved in
the checkpoint with the model, the optimizer and the epoch. A run killed after epoch k and resumed
ends with exactly the parameters of a run that never stopped (on the CPU; CUDA kernels need not be
deterministic). Schedules are functions of progress, so they need no state of their own.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .bounds import PerturbationSet
from .config import RunConfig, resolve
from .data import augment_batch, dataset_info
from .methods import METHODS, StepState
from .models import build_model
from .progress import Progress
from .schedules import LR_SCHEDULES, ramp

CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    model: nn.Module
    sec_per_epoch: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)  # one dict of means per epoch


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def make_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = config.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                               weight_decay=o.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def learning_rate(config: RunConfig, t: float) -> float:
    o = config.optimizer
    return LR_SCHEDULES.get(o.lr_schedule)(
        t, lr=o.lr, milestones=o.lr_milestones or (), factor=o.lr_factor, end_lr=o.end_lr,
        decay_start=o.decay_start or 0.0, total=config.epochs)


def train_eps(config: RunConfig, t: float) -> float:
    s = config.schedule
    return ramp(t, s.warmup_epochs, s.rampup_epochs, 0.0, config.eps_train)


def initial_model(config: RunConfig) -> nn.Module:
    torch.manual_seed(config.seed)  # the initial weights depend on the seed alone
    return build_model(config.model, dataset_info(config.dataset))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file then rename): a kill mid-write leaves the previous one intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    # weights_only=False: the checkpoint holds RNG states (tensors) and plain dicts/lists only,
    # but is written by this project; loading a foreign file is the caller's decision.
    return torch.load(path, map_location="cpu", weights_only=False)


def train(config: RunConfig, x: torch.Tensor, y: torch.Tensor,
          checkpoint_path: str | os.PathLike | None = None, resume: bool = True,
          on_epoch: Callable[[int, dict[str, float], float], None] | None = None,
          show_progress: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train `config` on (x, y) (CPU tensors in [0,1] pixel scale).

    With `checkpoint_path`, a checkpoint is written after every epoch and, if `resume` and one is
    there from the same config, training continues from it. `on_epoch(epoch, means, seconds)` is
    called after each epoch (1-based). `stop_after` ends after that many epochs in total (to
    simulate a kill in tests)."""
    config = resolve(config)
    device = resolve_device(config.device)
    info = dataset_info(config.dataset)
    model = initial_model(config).to(device)
    optimizer = make_optimizer(config, model)
    method = METHODS.get(config.method)(config)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(model)
    start_epoch = 0
    path = Path(checkpoint_path) if checkpoint_path else None
    if path is not None and resume and path.exists():
        state = load_checkpoint(path)
        if state.get("config") != config.model_dump():
            raise ValueError(f"checkpoint {path} was written by a different config; "
                             "remove it or pass resume=False")
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch = state["epoch"]
        method.load_state_dict(state.get("method_state", {}))
        result.sec_per_epoch, result.history = state["sec_per_epoch"], state["history"]

    n = len(x)
    steps_per_epoch = -(-n // config.batch_size)
    translate, flip = (info.translate, info.flip) if config.augment else (0, False)
    last_epoch = config.epochs if stop_after is None else min(config.epochs, stop_after)
    for epoch in range(start_epoch, last_epoch):
        model.train()
        progress = Progress(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}",
                            enabled=show_progress)
        order = torch.randperm(n, generator=generator)
        sums: dict[str, Any] = {}
        counts: dict[str, int] = {}  # a statistic's mean is over the steps that recorded it
        began = time.perf_counter()
        for step in range(steps_per_epoch):
            t = epoch + step / steps_per_epoch
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, t)
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            xb = augment_batch(x[index].to(device), translate, flip, generator)
            yb = y[index].to(device)
            eps = train_eps(config, t)
            state = StepState(t, eps, PerturbationSet(config.norm, eps), generator, index, step)
            loss, stats = method.loss(model, xb, yb, state)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
            if show_progress and (step % 10 == 0 or step == steps_per_epoch - 1):
                progress.update(0, f"loss {float(stats['loss']):.3f} eps {eps:.4f}")
            progress.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began  # training only: no evaluation inside
        progress.close()
        means = {key: float(value) / counts[key] for key, value in sums.items()}
        means.update(lr=learning_rate(config, epoch + 1 - 1e-9), eps_train=train_eps(config, epoch + 1))
        result.sec_per_epoch.append(seconds)
        result.history.append(means)
        if path is not None:
            save_checkpoint(path, {
                "format": CHECKPOINT_FORMAT,
                "config": config.model_dump(),
                "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer_state": optimizer.state_dict(),
                "epoch": epoch + 1,
                "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state()},
                "sec_per_epoch": result.sec_per_epoch,
                "history": result.history,
                "method_state": method.state_dict(),
            })
        if on_epoch is not None:
            on_epoch(epoch + 1, means, seconds)
    return result

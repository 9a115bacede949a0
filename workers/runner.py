"""One row: a resolved run config -> train (resumable) -> certify -> the result dict of the
"Interfaces" section of DESIGN.md. A Ray worker, the CLI and the tests all run rows through here.

The row's work folder holds `checkpoint.pt` (rewritten after every epoch) and `result.json`.
Running the same config again in the same folder resumes from the checkpoint, so a worker that
dies mid-row loses at most one epoch.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .core.attacks import PGD
from .core.bounds import PerturbationSet
from .core.certify import certify
from .core.config import RunConfig, resolve
from .core.data import load_split
from .core.diagnostics import measure
from .core.models import build
from .core.train import load_checkpoint, resolve_device, train
from .files import write_json
from .recorder import NullRecorder, Recorder, flatten

RESULT_FORMAT = 1


def test_subset(config: RunConfig) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The first `test_limit` examples of the test split (indices are positions in the split)."""
    x, y = load_split(config.dataset, "test", config.data_root)
    count = len(x) if config.test_limit is None else min(config.test_limit, len(x))
    return x[:count], y[:count], list(range(count))


def certify_model(model: nn.Module, config: RunConfig, show_progress: bool = False) -> dict[str, Any]:
    """metrics, per_example, certify timings and the diagnostics' figure data for `model` under
    the config's test settings."""
    x, y, indices = test_subset(config)
    a = config.attack
    attack = PGD(steps=a.steps, restarts=a.restarts, step_size=a.step_size, loss=a.loss)
    perturbation = PerturbationSet(config.norm, config.eps)
    outcome = certify(model, x, y, perturbation, config.certifiers, attack,
                      config.certify_batch_size, config.seed, show_progress)
    device = next(model.parameters()).device
    diagnosis = measure(model, x.to(device), perturbation, config.certifiers,
                        config.certify_batch_size, labels=y)
    return {
        "metrics": outcome.metrics() | diagnosis.metrics,
        # Small blocks the figures draw (the job store keeps them; per_example stays in files).
        "figure_data": diagnosis.figure_data,
        "per_example": outcome.per_example(y.tolist(), indices),
        "certify_sec": outcome.certify_sec,
        "data": {"name": config.dataset, "split": "test", "size": len(x),
                 "root": config.data_root},
    }


def run_row(config: RunConfig | dict[str, Any], workdir: str | os.PathLike,
            recorder: Recorder | None = None, resume: bool = True,
            show_progress: bool = False,
            after_epoch: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """`after_epoch(epoch, metrics)` runs after each epoch's checkpoint is written and recorded
    (a sweep trial reports to Ray Tune there, so a scheduler can stop it between epochs)."""
    config = resolve(config)
    recorder = recorder or NullRecorder()
    workdir = Path(workdir)
    checkpoint = workdir / "checkpoint.pt"
    x, y = load_split(config.dataset, "train", config.data_root)
    if config.train_limit is not None:
        x, y = x[:config.train_limit], y[:config.train_limit]
    recorder.log_params(flatten(config.model_dump()))

    def on_epoch(epoch: int, means: dict[str, float], seconds: float) -> None:
        recorder.log_metrics({**means, "sec_per_epoch": seconds}, step=epoch)
        if after_epoch is not None:
            after_epoch(epoch, {**means, "sec_per_epoch": seconds})

    began = time.perf_counter()
    trained = train(config, x, y, checkpoint, resume=resume, on_epoch=on_epoch,
                    show_progress=show_progress)
    train_sec = time.perf_counter() - began
    certified = certify_model(trained.model, config, show_progress)
    metrics = certified["metrics"]
    recorder.log_metrics(flatten(metrics), step=config.epochs)
    result = {
        "format": RESULT_FORMAT,
        "config": config.model_dump(),
        "metrics": metrics,
        "per_example": certified["per_example"],
        "figure_data": certified["figure_data"],
        "data": certified["data"] | {"train_size": len(x)},
        "timing": {"sec_per_epoch": trained.sec_per_epoch, "train_sec": train_sec,
                   "certify_sec": certified["certify_sec"]},
        "history": trained.history,
        "checkpoint": str(checkpoint.resolve()),
        "device": device_name(config.device),
    }
    write_json(workdir / "result.json", result)
    recorder.log_artifact(str(workdir / "result.json"))
    recorder.log_artifact(str(checkpoint))
    return result


def certify_checkpoint(path: str | os.PathLike, overrides: dict[str, Any],
                       show_progress: bool = False) -> dict[str, Any]:
    """Certify a checkpoint written by `run_row` under other test settings (norm, eps,
    certifiers, test_limit, attack...). The result's config is the training config with those
    overrides, so `config.eps` is the eps that was certified."""
    state = load_checkpoint(path)
    if "config" not in state or "model_state" not in state:
        raise ValueError(f"{path} is not a certrepro checkpoint (needs 'config' and 'model_state')")
    config = resolve({**state["config"], **overrides})
    model = build(state["config"])
    model.load_state_dict(state["model_state"])
    model.to(resolve_device(config.device))
    certified = certify_model(model, config, show_progress)
    return {
        "format": RESULT_FORMAT,
        "config": config.model_dump(),
        "metrics": certified["metrics"],
        "per_example": certified["per_example"],
        "figure_data": certified["figure_data"],
        "data": certified["data"],
        "timing": {"sec_per_epoch": state.get("sec_per_epoch", []),
                   "certify_sec": certified["certify_sec"]},
        "checkpoint": str(Path(path).resolve()),
        "device": device_name(config.device),
    }


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


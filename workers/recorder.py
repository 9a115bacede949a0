"""What a row reports while it runs. The runner only talks to this small interface: the MLflow
recorder (orchestrator) implements it in production, `MemoryRecorder` in tests, `NullRecorder`
when nobody listens."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from .files import write_json


class Recorder(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str) -> None: ...


class NullRecorder:
    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str) -> None:
        pass


class MemoryRecorder:
    def __init__(self):
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[str] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str) -> None:
        self.artifacts.append(path)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested config and metrics as flat keys for trackers."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class FanOut:
    """Report to several recorders at once (e.g. MLflow and the progress file)."""

    def __init__(self, *recorders: Recorder):
        self.recorders = recorders

    def log_params(self, params: dict[str, Any]) -> None:
        for recorder in self.recorders:
            recorder.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for recorder in self.recorders:
            recorder.log_metrics(metrics, step)

    def log_artifact(self, path: str) -> None:
        for recorder in self.recorders:
            recorder.log_artifact(path)


class ProgressFile(NullRecorder):
    """The latest epoch and metrics of a row, in `progress.json` beside its checkpoint: the
    dispatcher reads it to report "epoch k of n" without talking to the worker."""

    def __init__(self, path: str | Path, epochs: int):
        self.path, self.epochs = Path(path), epochs

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        write_json(self.path, {"epoch": min(step, self.epochs), "epochs": self.epochs,
                               "metrics": numbers}, indent=None)


def read_progress(path: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None

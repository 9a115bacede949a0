"""The run configuration: one pydantic model, validated against the registries, then resolved
(every default filled in from the method's paper and the data set) before anything runs. The
resolved config is what a checkpoint, a result and (later) MLflow record, and what its hash is
computed from.

Errors name the field and the allowed values; `describe_errors` turns a ValidationError into lines
a person can act on.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from .bounds.perturbation import NORMS
from .certify import CERTIFIERS
from .data import DATASETS, dataset_info
from .methods import METHODS
from .models import MODELS, check_model_fits
from .schedules import LR_SCHEDULES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _known(registry, name: str) -> str:
    registry.get(name)  # raises ValueError listing the known names
    return name


class OptimizerConfig(_Strict):
    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0, le=10)
    lr_schedule: str = "step"
    lr_milestones: list[float] | None = Field(
        None, description="epochs at which a step schedule multiplies lr by lr_factor; "
                          "None: the method's paper milestones")
    lr_factor: float | None = Field(None, gt=0, le=1,
                                    description="None: the method's paper factor (IBP: 0.1)")
    end_lr: float | None = Field(None, gt=0, description="exponential schedule: final lr")
    decay_start: float | None = Field(None, ge=0, description="exponential schedule: epoch m")
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")

    @field_validator("lr_schedule")
    @classmethod
    def _schedule_known(cls, value: str) -> str:
        return _known(LR_SCHEDULES, value)


class ScheduleConfig(_Strict):
    """The eps curriculum (and kappa's, for IBP): start values until warmup_epochs, then linear
    over rampup_epochs. None: the method's paper defaults, scaled to the run's epochs."""
    warmup_epochs: float | None = Field(None, ge=0)
    rampup_epochs: float | None = Field(None, ge=0)


class AttackConfig(_Strict):
    """The PGD attack of the empirical column (IBP paper: 200 steps, 10 restarts)."""
    steps: int = Field(200, ge=0, le=100_000)
    restarts: int = Field(10, ge=1, le=1000)
    step_size: float | None = Field(None, gt=0)
    loss: Literal["margin", "ce"] = "margin"


class RunConfig(_Strict):
    method: str = "ibp"
    dataset: str = "digits"
    model: str = "small"
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(0.1, ge=0, description="certification eps, [0,1] pixel scale")
    eps_train: float | None = Field(None, ge=0, description="training eps; None: eps")
    epochs: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(100, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0)
    certifiers: list[str] = Field(default_factory=lambda: ["ibp"])
    test_limit: int | None = Field(None, ge=1, description="certify the first N test examples")
    train_limit: int | None = Field(None, ge=1, description="train on the first N examples")
    device: Literal["cpu", "cuda"] = "cpu"
    data_root: str | None = None
    augment: bool | None = Field(None, description="None: the data set's paper default")
    certify_batch_size: int = Field(256, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    method_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _method_known(cls, value: str) -> str:
        return _known(METHODS, value)

    @field_validator("dataset")
    @classmethod
    def _dataset_known(cls, value: str) -> str:
        return _known(DATASETS, value)

    @field_validator("model")
    @classmethod
    def _model_known(cls, value: str) -> str:
        return _known(MODELS, value)

    @field_validator("certifiers")
    @classmethod
    def _certifiers_known(cls, value: list[str]) -> list[str]:
        for name in value:
            _known(CERTIFIERS, name)
        if len(set(value)) != len(value):
            raise ValueError("certifiers must not repeat")
        return value

    @field_validator("eps", "eps_train")
    @classmethod
    def _eps_in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        # eps beyond the input set's diameter is a mistake (likely 0-255 scale), not an experiment.
        norm, dataset = info.data.get("norm"), info.data.get("dataset")
        if value is None or norm is None:
            return value
        limit = 1.0
        if norm == "l2":
            limit = math.sqrt(math.prod(dataset_info(dataset or "digits").input_shape))
        if value > limit:
            raise ValueError(f"{value} is out of range for norm {norm}: eps is in [0,1] pixel "
                             f"scale, so it must be in [0, {limit:g}]")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        info = dataset_info(self.dataset)
        check_model_fits(self.model, info)
        options = METHODS.get(self.method).Options
        try:
            options(**self.method_options)
        except ValidationError as error:
            lines = describe_errors(error, options, prefix="method_options.")
            raise ValueError(f"method_options of {self.method!r}: {'; '.join(lines)}") from None
        return self


def resolve(config: RunConfig | dict[str, Any]) -> RunConfig:
    """A fully resolved copy: every default that depends on the method, data set or epochs filled."""
    config = RunConfig.model_validate(config if isinstance(config, dict) else config.model_dump())
    method = METHODS.get(config.method)
    info = dataset_info(config.dataset)
    updates: dict[str, Any] = {}
    if config.eps_train is None:
        updates["eps_train"] = config.eps
    if config.augment is None:
        updates["augment"] = bool(info.translate or info.flip)
    schedule = config.schedule.model_copy(update={
        "warmup_epochs": _default(config.schedule.warmup_epochs,
                                  method.warmup_fraction * config.epochs),
        "rampup_epochs": _default(config.schedule.rampup_epochs,
                                  method.rampup_fraction * config.epochs)})
    optimizer = config.optimizer
    if optimizer.lr_milestones is None:
        optimizer = optimizer.model_copy(update={"lr_milestones": [
            f * config.epochs for f in method.lr_milestone_fractions]})
    if optimizer.lr_factor is None:
        optimizer = optimizer.model_copy(update={"lr_factor": method.lr_factor})
    options = method.Options(**config.method_options).model_dump()
    return config.model_copy(update=updates | {
        "schedule": schedule, "optimizer": optimizer, "method_options": options})


def _default(value: float | None, fallback: float) -> float:
    return fallback if value is None else value


def config_hash(config: RunConfig) -> str:
    """Short stable hash of the resolved config (fields that do not change the run excluded)."""
    data = resolve(config).model_dump(exclude={"device", "data_root", "certify_batch_size"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def describe_errors(error: ValidationError, model: type[BaseModel] | None = None,
                    prefix: str = "") -> list[str]:
    """One line per problem: the dotted field path and what is wrong / allowed."""
    lines = []
    for item in error.errors():
        path = prefix + (".".join(str(part) for part in item["loc"]) or "config")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
            parent = _model_at(model or RunConfig, item["loc"][:-1])
            if parent is not None:
                message += f"; allowed: {', '.join(parent.model_fields) or 'none'}"
        elif item["type"] == "literal_error":
            message = f"{message}, got {item.get('input')!r}"
        lines.append(f"{path}: {message}")
    return lines


def _model_at(model: type[BaseModel], location: tuple) -> type[BaseModel] | None:
    for part in location:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model

"""The schema of an experiment spec: one YAML file per paper table (`experiments/<paper>/<table>.yaml`).

A spec names the paper, the table's columns (which metric of a row result each shows and in what
unit), the run configs of its rows for two profiles (`paper`: the paper's protocol; `quick`: a
minutes-long CPU run whose numbers are not comparable with the paper's), and the numbers the paper
reports, each with its source in the paper's text.

Configs are plain dicts here: `experiments` imports nothing from `workers`, so a row may name a
method or certifier that certrepro does not have yet; the orchestrator validates the merged config
with `RunConfig` and marks such rows as not implemented.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROFILES = ("quick", "paper", "smoke")
# `smoke`: the quick profile cut to seconds, to check that a row runs end to end (CI runs one row
# of every table this way). Its numbers mean nothing; the complete verifier is left out because
# its time limit is per example and minutes long.
SMOKE = {"epochs": 1, "train_limit": 64, "test_limit": 8, "batch_size": 32,
         "attack": {"steps": 2, "restarts": 1}}
SMOKE_DROPPED_CERTIFIERS = ("mip",)
# Data sets read from files are replaced by the built-in one of the same shape, so a smoke run
# needs no data folder.
SMOKE_DATASETS = {"mnist-idx": "digits", "mnist": "digits"}
TRANSFORMS = ("error_pct", "acc_pct", "raw")
# Fields every merged row config must have (DESIGN.md: "A run config ... has at least").
REQUIRED_CONFIG_FIELDS = ("method", "dataset", "model", "norm", "eps", "epochs", "batch_size",
                          "certifiers")
ROW_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # url-safe: usable as a path segment
METRIC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_+-]+)*$")
# Which block of a row result a column's `metric` path reads (DESIGN.md: a result holds `metrics`,
# `timing` {sec_per_epoch: [...], train_sec, certify_sec} and `history` [per-epoch means]).
BLOCKS = ("metrics", "timing", "history")
# How a per-epoch list (timing.sec_per_epoch, a history curve) becomes one number.
REDUCE = ("mean", "last", "max", "min")
# How a column combines a row's runs (its seeds, times the models of its `family`): one run, or a
# statistic over the runs. `mean`, `std`, `median`, `q1`, `q3` (50th, 25th, 75th percentiles) are
# taken over the runs' values in the column's unit (after its transform: the q1 of an error column
# is the 25th percentile of the errors); `best` and `worst` are the runs with the highest and the
# lowest raw metric value (metrics are accuracies: the best run has the lowest error).
AGGREGATES = ("single", "mean", "std", "median", "q1", "q3", "best", "worst")
MULTI_RUN_AGGREGATES = ("std", "median", "q1", "q3", "best", "worst")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Paper(_Strict):
    file: str | None = Field(None, description="file name in shared/papers (None: no paper)")
    title: str
    short: str = Field(description="short name, e.g. 'IBP'")


class Column(_Strict):
    key: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    label: str
    metric: str = Field(description="dotted path into a row result's metrics, e.g. verified_acc.ibp")
    transform: Literal["error_pct", "acc_pct", "raw"] = "error_pct"
    tolerance: float | None = Field(None, ge=0, description="None: the spec's tolerance")
    note: str | None = None
    block: Literal["metrics", "timing", "history"] = Field(
        "metrics", description="the part of a row result `metric` is a path into: metrics "
                               "(default), timing (e.g. sec_per_epoch) or history (a per-epoch "
                               "training curve, e.g. varying_fraction)")
    reduce: Literal["mean", "last", "max", "min"] | None = Field(
        None, description="how a per-epoch list becomes one number; required for the timing and "
                          "history blocks (sec_per_epoch: mean)")
    aggregate: Literal["single", "mean", "std", "median", "q1", "q3", "best", "worst"] = Field(
        "single", description="how the column combines a row's runs (seeds): single (one run), "
                              "mean, std, median, q1/q3 (quartiles), best/worst (the run with "
                              "the highest/lowest metric value); all but single and mean need "
                              "at least two seeds per row")
    speedup_over: str | None = Field(
        None, description="timing columns: also show each row's speed-up over the row of its "
                          "group with this label (BCP Table 1's 'Speed up' = CAP's time / BCP's), "
                          "for ours and for the paper's numbers alike")

    @field_validator("metric")
    @classmethod
    def _metric_path(cls, value: str) -> str:
        return _check_metric(value)

    @model_validator(mode="after")
    def _reduced(self) -> "Column":
        if self.block != "metrics" and self.reduce is None:
            raise ValueError(f"column {self.key!r}: a {self.block} metric is a per-epoch list; "
                             f"say how it becomes one number with reduce: {', '.join(REDUCE)}")
        if self.block == "metrics" and self.reduce is not None:
            raise ValueError(f"column {self.key!r}: reduce applies to the timing and history "
                             "blocks only (metrics are single numbers)")
        if self.speedup_over is not None and self.block != "timing":
            raise ValueError(f"column {self.key!r}: speedup_over applies to timing columns only "
                             "(a ratio of times)")
        return self


class Source(_Strict):
    """Where in the paper's text a reported number stands."""
    file: str
    table: str
    row: str
    column: str


class Reported(_Strict):
    value: float | None = Field(description="in the column's unit; null: the paper has no number")
    source: Source | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _sourced(self) -> "Reported":
        if self.value is not None and self.source is None:
            raise ValueError("a reported value needs its source {file, table, row, column}")
        if self.value is None and not self.note:
            raise ValueError("a null reported value needs a note saying why "
                             "(e.g. 'paper: could not verify')")
        return self


class Row(_Strict):
    id: str
    label: str
    group: str = ""
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="paper-profile fields over the spec's defaults")
    quick: dict[str, Any] = Field(default_factory=dict,
                                  description="row-specific overrides for the quick profile")
    reported: dict[str, Reported] = Field(default_factory=dict)
    seeds: list[int] | None = None
    family: list[str] | None = Field(
        None, min_length=2, description="a family of models (003 Tables 2 and 4: Zhang et al.'s "
                                        "8 large models): the row runs once per model (and seed), "
                                        "its config's `model` replaced by each; its aggregate "
                                        "columns combine all those runs")
    note: str | None = None

    @field_validator("family")
    @classmethod
    def _family(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("family models must not repeat")
        return value

    @field_validator("id")
    @classmethod
    def _url_safe(cls, value: str) -> str:
        if not ROW_ID.match(value):
            raise ValueError(f"row id {value!r} is not url-safe: use letters, digits, '.', '_', "
                             "'-' (starting with a letter or digit)")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            _check_seeds(value)
        return value


class SweepSpec(_Strict):
    """A table that is a sweep in itself (a grid over a few hyper-parameters). The search space
    uses the sampler format of sweep jobs; `row_fields` are the swept config fields that identify
    a row of the table, so each trial's result lands in the row whose config has its values."""
    search_space: dict[str, dict[str, Any]] = Field(min_length=1)
    metric: str
    mode: Literal["max", "min"]
    row_fields: list[str] = Field(min_length=1)
    num_samples: int = Field(1, ge=1)
    scheduler: dict[str, Any] | None = None

    @field_validator("metric")
    @classmethod
    def _metric_path(cls, value: str) -> str:
        return _check_metric(value)


class TableSpec(_Strict):
    name: str = Field(description="'<paper>/<table>', the spec's path under experiments/")
    paper: Paper
    caption: str
    notes: str | None = None
    columns: list[Column] = Field(min_length=1)
    defaults: dict[str, Any] = Field(default_factory=dict)
    quick: dict[str, Any] = Field(default_factory=dict)
    tolerance: float = Field(ge=0, description="absolute, in the columns' unit")
    seeds: list[int] = Field(default_factory=lambda: [0])
    rows: list[Row] = Field(min_length=1)
    sweep: SweepSpec | None = Field(None, description="the table is a grid: run it as a sweep")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        return _check_seeds(value)

    @model_validator(mode="after")
    def _consistent(self) -> "TableSpec":
        keys = [c.key for c in self.columns]
        if len(set(keys)) != len(keys):
            raise ValueError(f"column keys repeat: {keys}")
        ids = [r.id for r in self.rows]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"row ids repeat: {', '.join(repeated)}")
        for row in self.rows:
            unknown = sorted(set(row.reported) - set(keys))
            if unknown:
                raise ValueError(f"row {row.id!r}: reported values for unknown columns "
                                 f"{unknown}; columns: {', '.join(keys)}")
        labels = {r.label for r in self.rows}
        for column in self.columns:
            if column.speedup_over is not None and column.speedup_over not in labels:
                raise ValueError(f"column {column.key!r}: speedup_over {column.speedup_over!r} "
                                 f"is no row's label; labels: {', '.join(sorted(labels))}")
        multi = [c.key for c in self.columns if c.aggregate in MULTI_RUN_AGGREGATES]
        if multi:
            for row in self.rows:
                if len(row.seeds or self.seeds) * len(row.family or [None]) < 2:
                    raise ValueError(f"row {row.id!r}: columns {multi} aggregate over runs "
                                     "(std, median, quartiles, best/worst) and need at least two "
                                     "runs (seeds, the row's or the spec's, times the models of "
                                     "its `family`)")
        if self.sweep is not None:
            for row in self.rows:
                missing = [f for f in self.sweep.row_fields if config_value(row.config, f) is None]
                if missing:
                    raise ValueError(f"row {row.id!r}: a sweep row's config must set the swept "
                                     f"fields {missing} (sweep.row_fields)")
        return self

    def column_tolerance(self, column: Column) -> float:
        return self.tolerance if column.tolerance is None else column.tolerance

    def row(self, row_id: str) -> Row:
        for row in self.rows:
            if row.id == row_id:
                return row
        raise KeyError(row_id)


def _check_metric(value: str) -> str:
    if not METRIC.match(value):
        raise ValueError(f"metric must be a dotted path like 'verified_acc.ibp', got {value!r}")
    return value


def config_value(config: dict[str, Any], path: str) -> Any:
    """config["a"]["b"] for "a.b"; None where missing."""
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _check_seeds(value: list[int]) -> list[int]:
    if not value:
        raise ValueError("seeds must not be empty")
    if any(seed < 0 for seed in value):
        raise ValueError("seeds must be >= 0")
    if len(set(value)) != len(value):
        raise ValueError("seeds must not repeat")
    return value


def deep_merge(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Later layers override earlier ones; nested dicts merge key by key, anything else (lists
    included) is replaced. An explicit null replaces too (it resets a field to RunConfig's default).
    Inputs are not modified."""
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = deep_merge(result[key], value)
            else:
                result[key] = copy.deepcopy(value)
    return result


def merged_config(spec: TableSpec, row: Row, profile: str) -> dict[str, Any]:
    """The row's config for `profile` (no seed): defaults + row.config, then for `quick` the spec's
    and the row's quick overrides, and for `smoke` those and SMOKE."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    config = deep_merge(spec.defaults, row.config)
    if profile in ("quick", "smoke"):
        config = deep_merge(config, spec.quick, row.quick)
    if profile == "smoke":
        config = deep_merge(config, SMOKE)
        if config.get("dataset") in SMOKE_DATASETS:
            config["dataset"] = SMOKE_DATASETS[config["dataset"]]
            config.pop("data_root", None)
        config["certifiers"] = [c for c in config.get("certifiers") or []
                                if c not in SMOKE_DROPPED_CERTIFIERS] or ["ibp"]
    return config

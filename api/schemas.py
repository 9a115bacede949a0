"""Request bodies of POST /jobs, one model per job kind, chosen by `kind`."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class RunJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["run"]
    config: dict[str, Any] = Field(description="a run config, the schema of `certrepro run`")


class TableJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["table"]
    spec: str = Field(min_length=1, max_length=200, description="e.g. 'ibp/table4'")
    rows: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, min_length=1, max_length=1000, description="row ids; all rows when left out")
    profile: Literal["quick", "paper", "smoke"] = Field(
        "quick", description="smoke: seconds per row, to check that rows run (numbers mean nothing)")
    seeds: list[Annotated[int, Field(ge=0, le=1_000_000)]] = Field(
        default_factory=lambda: [0], min_length=1, max_length=100)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpu: float = Field(1.0, gt=0, le=1024, description="CPUs per trial (fractions allowed)")
    gpu: float = Field(0.0, ge=0, le=64, description="GPUs per trial (fractions allowed)")


class SweepJob(BaseModel):
    """A Ray Tune search over a run config. The base config is `config`, or a spec's row (`spec`
    and `row`), or a sweep spec's defaults (`spec` alone, its search space and metric), with
    `config` merged over it. The search space maps config fields to samplers (see
    orchestrator/sweep_space.py)."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["sweep"]
    config: dict[str, Any] | None = None
    spec: str | None = Field(None, min_length=1, max_length=200)
    row: str | None = Field(None, min_length=1, max_length=200)
    profile: Literal["quick", "paper"] = "quick"
    search_space: dict[str, Any] | None = Field(
        None, description='field -> sampler, e.g. {"optimizer.lr": {"loguniform": [1e-4, 1e-2]}}')
    metric: str | None = Field(None, max_length=200, description="e.g. verified_acc.ibp")
    mode: Literal["max", "min"] | None = None
    num_samples: int | None = Field(None, ge=1, le=1000, description="samples of the space "
                                    "(each grid point is run num_samples times)")
    scheduler: dict[str, Any] | None = Field(
        None, description='{"name": "asha", "max_t": 10, "grace_period": 1, '
                          '"reduction_factor": 2} or {"name": "none"}')
    max_concurrent_trials: int | None = Field(None, ge=1, le=1000)
    resources_per_trial: Resources = Field(default_factory=Resources)
    max_failures: int = Field(1, ge=0, le=20, description="retries of a failed trial")


JobRequest = Annotated[Union[RunJob, TableJob, SweepJob], Field(discriminator="kind")]

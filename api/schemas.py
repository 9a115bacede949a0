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
    profile: Literal["quick", "paper"] = "quick"
    seeds: list[Annotated[int, Field(ge=0, le=1_000_000)]] = Field(
        default_factory=lambda: [0], min_length=1, max_length=100)


class SweepJob(BaseModel):
    model_config = ConfigDict(extra="allow")
    kind: Literal["sweep"]


JobRequest = Annotated[Union[RunJob, TableJob, SweepJob], Field(discriminator="kind")]

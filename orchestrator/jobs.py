"""Turning a job request into the rows the store queues: a `run` job is one row; a `table` job is
one row per selected spec row and seed. Every row's config is validated and fully resolved here,
before anything is written. Rows whose method or certifier certrepro does not have yet are left
out of the job and named, never faked."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

import experiments
from workers.core.certify import CERTIFIERS
from workers.core.config import RunConfig, describe_errors, resolve
from workers.core.methods import METHODS

from .store import NewRow


class JobRequestError(ValueError):
    """A request that cannot become a job; `problems` are (field, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{field}: {message}" for field, message in problems))


@dataclass
class Plan:
    rows: list[NewRow]
    not_implemented: list[dict[str, Any]] = field(default_factory=list)  # rows left out, and why
    dropped_certifiers: dict[str, list[str]] = field(default_factory=dict)  # row -> certifiers


def validated_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return resolve(RunConfig.model_validate(config)).model_dump()
    except ValidationError as error:
        raise JobRequestError([(f"{where}.{line.split(':', 1)[0]}", line.split(': ', 1)[-1])
                               for line in describe_errors(error)]) from None


def plan_run(config: dict[str, Any]) -> Plan:
    resolved = validated_config(config, "config")
    return Plan([NewRow(name="run", config=resolved, seed=resolved["seed"])])


def plan_table(spec_name: str, rows: list[str] | None, profile: str,
               seeds: list[int] | None) -> Plan:
    try:
        spec = experiments.load_spec(spec_name)
    except ValueError as error:
        raise JobRequestError([("spec", str(error))]) from None
    try:
        selected = experiments.row_configs(spec, profile, rows, seeds)
    except experiments.UnknownRow as error:
        raise JobRequestError([("rows", str(error))]) from None
    except ValueError as error:
        field_name = "profile" if "profile" in str(error) else "seeds"
        raise JobRequestError([(field_name, str(error))]) from None
    plan = Plan([])
    for row_id, seed, config in selected:
        missing_method = config.get("method") not in METHODS
        if missing_method:
            plan.not_implemented.append({"row": row_id, "seed": seed, "reason":
                                         f"method {config.get('method')!r} is not implemented"})
            continue
        certifiers = list(config.get("certifiers") or [])
        available = [name for name in certifiers if name in CERTIFIERS]
        if certifiers and not available:
            plan.not_implemented.append({"row": row_id, "seed": seed, "reason":
                                         f"none of the certifiers {certifiers} is implemented"})
            continue
        if available != certifiers:
            plan.dropped_certifiers[row_id] = [c for c in certifiers if c not in CERTIFIERS]
            config = {**config, "certifiers": available}
        resolved = validated_config(config, f"rows[{row_id}].config")
        plan.rows.append(NewRow(name=row_id, config=resolved, seed=seed))
    if not plan.rows:
        reasons = "; ".join(f"{item['row']}: {item['reason']}" for item in plan.not_implemented)
        raise JobRequestError([("rows", f"no selected row can run yet ({reasons})")])
    return plan

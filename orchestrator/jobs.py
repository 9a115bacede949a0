"""Turning a job request into the rows the store queues: a `run` job is one row; a `table` job is
one row per selected spec row and seed; a `sweep` job is one row (the sweep, run by Ray Tune) whose
trials are rows of the same runner. Every row's config is validated and fully resolved here,
before anything is written. Rows of a table job that would train the identical model share one
training (orchestrator.shared_training): the first trains, the others certify its checkpoint.
Rows whose method or certifier certrepro does not have yet are left out of the job and named,
never faked."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

import experiments
from workers.core.certify import CERTIFIERS
from workers.core.config import RunConfig, describe_errors, resolve
from workers.core.data import DATASETS
from workers.core.methods import METHODS
from workers.core.models import MODELS

from . import sweep_space
from .shared_training import assign_trainers
from .store import NewRow

MAX_TRIALS = 1000
CERTIFY_METRICS = ("clean_acc", "pgd_acc")  # plus verified_acc.<certifier>


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
    sweep: dict[str, Any] | None = None  # a sweep job's settings, checked and with defaults


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
    families = {row.id: row.family for row in spec.rows if row.family}
    for row_id, seed, config in selected:
        reason = _not_implemented(config, families.get(row_id))
        if reason:
            plan.not_implemented.append({"row": row_id, "seed": seed, "reason": reason})
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
    for row, trainer in zip(plan.rows, assign_trainers([row.config for row in plan.rows])):
        row.trained_by = trainer
    return plan


def _not_implemented(config: dict[str, Any], family: list[str] | None) -> str | None:
    """Why a table row cannot run yet (its method, model, family or data set is not in
    certrepro), or
    None. Certifiers are checked by the caller: some missing ones only drop a column."""
    if config.get("method") not in METHODS:
        return f"method {config.get('method')!r} is not implemented"
    if family:
        missing = [name for name in family if name not in MODELS]
        if missing:
            return f"models {missing} of the row's family are not defined"
        return "rows over a family of models are not run yet"
    if config.get("model") not in MODELS:
        return f"model {config.get('model')!r} is not defined"
    if config.get("dataset") not in DATASETS:
        return f"data set {config.get('dataset')!r} is not available"
    return None


def plan_sweep(request: dict[str, Any]) -> Plan:
    """One row (the sweep) and its settings: the base config (the request's `config`, or a spec
    row, or a sweep spec's defaults, with `config` over it), the search space checked point by
    point against RunConfig, the metric, the scheduler. Every problem is a (field, message)."""
    base, source, defaults = _sweep_base(request)
    dropped = [c for c in base.get("certifiers") or [] if c not in CERTIFIERS]
    if dropped:
        base = {**base, "certifiers": [c for c in base["certifiers"] if c in CERTIFIERS]}
    space = request.get("search_space") or defaults.get("search_space")
    try:
        dims = sweep_space.parse_space(space)
    except sweep_space.SpaceError as error:
        raise JobRequestError(error.problems) from None
    swept = {f for d in dims for f in d.fields}
    if base.get("method") not in METHODS and "method" not in swept:
        raise JobRequestError([("config.method", f"method {base.get('method')!r} is not "
                                f"implemented yet; implemented: {', '.join(METHODS.names())}")])
    resolved = validated_config(base, "config")
    problems = []
    for dim in dims:
        problems += _check_dimension(base, dim)
    metric = request.get("metric") or defaults.get("metric")
    mode = request.get("mode") or defaults.get("mode")
    problems += _check_metric(metric, resolved)
    if mode not in ("max", "min"):
        problems.append(("mode", f"must be max or min, got {mode!r}"))
    num_samples = request.get("num_samples") or defaults.get("num_samples") or 1
    total = num_samples * sweep_space.grid_size(dims)
    if total > MAX_TRIALS:
        problems.append(("num_samples", f"the sweep would run {total} trials (num_samples "
                         f"{num_samples} x grid points); at most {MAX_TRIALS}"))
    try:
        scheduler = sweep_space.parse_scheduler(
            request.get("scheduler") or defaults.get("scheduler"), resolved["epochs"])
    except sweep_space.SpaceError as error:
        problems += error.problems
        scheduler = None
    if problems:
        raise JobRequestError(problems)
    resources = request.get("resources_per_trial") or {}
    sweep = {
        "search_space": {d.key: d.to_json() for d in dims},
        "metric": metric, "mode": mode, "num_samples": num_samples, "trials": total,
        "scheduler": scheduler,
        "max_concurrent_trials": request.get("max_concurrent_trials"),
        "resources_per_trial": {"cpu": float(resources.get("cpu", 1.0)),
                                "gpu": float(resources.get("gpu", 0.0))},
        "max_failures": request.get("max_failures", 1),
        "source": source,
    }
    plan = Plan([NewRow(name="sweep", config=resolved, seed=resolved["seed"])], sweep=sweep)
    if dropped:
        plan.dropped_certifiers["sweep"] = dropped
    return plan


def _sweep_base(request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict]:
    """(base config, where it came from, the spec's sweep defaults)."""
    config = request.get("config") or {}
    spec_name, row_id = request.get("spec"), request.get("row")
    profile = request.get("profile") or "quick"
    if spec_name is None:
        if row_id is not None:
            raise JobRequestError([("row", "a row needs its spec: give spec as well")])
        if not config:
            raise JobRequestError([("config", "give the base configuration (config), or a "
                                    "spec with a sweep, or a spec and one of its rows")])
        return dict(config), {"kind": "config"}, {}
    try:
        spec = experiments.load_spec(spec_name)
    except ValueError as error:
        raise JobRequestError([("spec", str(error))]) from None
    if row_id is not None:
        try:
            ((_, _, row_config),) = experiments.row_configs(spec, profile, [row_id], None)[:1]
        except experiments.UnknownRow as error:
            raise JobRequestError([("row", str(error))]) from None
        defaults: dict[str, Any] = {}
    elif spec.sweep is None:
        raise JobRequestError([("spec", f"spec {spec_name!r} is not a sweep; name one of its "
                                f"rows ({', '.join(r.id for r in spec.rows)}) as `row`")])
    else:
        row_config = experiments.sweep_base_config(spec, profile)
        defaults = spec.sweep.model_dump()
    base = experiments.deep_merge(row_config, config)
    return base, {"kind": "spec", "spec": spec_name, "row": row_id, "profile": profile}, defaults


def _check_dimension(base: dict[str, Any], dim: sweep_space.Dimension) -> list[tuple[str, str]]:
    """Every value a dimension can take must make a valid config (its field must exist)."""
    where = f"search_space.{dim.key}"
    for assignment in dim.assignments():
        try:
            config = base
            for field_name, value in assignment.items():
                config = sweep_space.assign(config, field_name, value)
            validated_config(config, "")
        except ValueError as error:
            problems = getattr(error, "problems", None) or [("", str(error))]
            value = next(iter(assignment.values())) if len(assignment) == 1 else list(
                assignment.values())
            return [(where, f"{_prefix(inner)}{message} (value {value!r})")
                    for inner, message in problems]
    return []


def _prefix(inner: str) -> str:
    """The field a config error names inside a search-space entry ("" for the whole config)."""
    inner = inner.strip(".")
    return "" if inner in ("", "config") else f"{inner}: "


def _check_metric(metric: Any, config: dict[str, Any]) -> list[tuple[str, str]]:
    certified = list(CERTIFY_METRICS) + [f"verified_acc.{c}" for c in config["certifiers"]]
    allowed = (f"{', '.join(certified)} (certified on the test subset, evaluated every epoch), "
               "or a per-epoch training statistic of the method such as loss")
    if not isinstance(metric, str) or not experiments.schema.METRIC.match(metric):
        return [("metric", f"expected a metric name; allowed: {allowed}")]
    if metric.startswith("verified_acc.") and metric not in certified:
        return [("metric", f"{metric} needs certifier {metric.split('.', 1)[1]!r} in the "
                           f"config's certifiers ({', '.join(config['certifiers']) or 'none'}); "
                           f"allowed: {allowed}")]
    return []

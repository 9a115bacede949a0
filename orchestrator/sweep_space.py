"""Search spaces and trial schedulers of sweep jobs: what a request may ask for, checked before a
job is written, and turned into Ray Tune objects when the sweep runs.

A search space maps a run-config field (a dotted path: `eps_train`, `optimizer.lr`,
`method_options.kappa_final`) to one sampler:

    {"optimizer.lr": {"loguniform": [1e-4, 1e-2]}, "eps_train": {"grid": [0.1, 0.2]}}

Several fields joined with `|` take a `grid` or `choice` of lists, one value per field: a grid of
points that is not a full product (003 Table 3 varies lambda with gamma = 0, then gamma with
lambda = 0).

Samplers and schedulers are registries (name -> object); an unknown name lists the known ones.
Ray is imported only when a sweep is built, so the API can validate without it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

JOINT = "|"  # separator of the fields of a joint dimension


class SpaceError(ValueError):
    """A search space or scheduler the sweep cannot use; `problems` are (field, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{field}: {message}" for field, message in problems))


# -- samplers ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampler:
    """One kind of search-space dimension. `normalize` checks the arguments and returns them in
    one canonical form (or raises ValueError with what is allowed); `points` are the values that
    must each make a valid config; `size` is the number of trials a grid multiplies the sweep by
    (1 for sampled dimensions); `tune` builds the Ray Tune domain."""
    normalize: Callable[[Any], Any]
    points: Callable[[Any], list]
    size: Callable[[Any], int]
    tune: Callable[[Any], Any]
    help: str


def _values(args: Any) -> list:
    if not isinstance(args, list):
        raise ValueError(f"expected a list of values, got {type(args).__name__}")
    if not args:
        raise ValueError("the list of values is empty; give at least one value")
    return args


def _bounds(integer: bool, positive: bool) -> Callable[[Any], dict]:
    def normalize(args: Any) -> dict:
        if isinstance(args, dict):
            unknown = sorted(set(args) - {"low", "high"})
            if unknown:
                raise ValueError(f"unknown keys {unknown}; allowed: low, high")
            if "low" not in args or "high" not in args:
                raise ValueError("needs both low and high")
            low, high = args["low"], args["high"]
        elif isinstance(args, list) and len(args) == 2:
            low, high = args
        else:
            raise ValueError("expected [low, high] or {low: .., high: ..}")
        kind = "an integer" if integer else "a number"
        for name, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
                    integer and not float(value).is_integer()) or not math.isfinite(value):
                raise ValueError(f"{name} must be {kind}, got {value!r}")
        if low > high:
            raise ValueError(f"low ({low}) is greater than high ({high})")
        if integer and low == high:
            raise ValueError(f"randint draws from [low, high): low ({low}) must be less than "
                             f"high ({high})")
        if positive and low <= 0:
            raise ValueError(f"loguniform needs 0 < low, got low={low}")
        if integer:
            return {"low": int(low), "high": int(high)}
        return {"low": float(low), "high": float(high)}
    return normalize


def _tune(name: str) -> Callable[[Any], Any]:
    def build(args: Any) -> Any:
        from ray import tune
        if name == "grid":
            return tune.grid_search(list(args))
        if name == "choice":
            return tune.choice(list(args))
        return getattr(tune, name)(args["low"], args["high"])
    return build


SAMPLERS: dict[str, Sampler] = {
    "grid": Sampler(_values, list, len, _tune("grid"),
                    "every value, once per sample: [v1, v2, ...]"),
    "choice": Sampler(_values, list, lambda _: 1, _tune("choice"),
                      "one value drawn per trial: [v1, v2, ...]"),
    "uniform": Sampler(_bounds(False, False), lambda a: [a["low"], a["high"]], lambda _: 1,
                       _tune("uniform"), "[low, high], low <= high"),
    "loguniform": Sampler(_bounds(False, True), lambda a: [a["low"], a["high"]], lambda _: 1,
                          _tune("loguniform"), "[low, high], 0 < low <= high"),
    # Ray's randint excludes high; the upper point checked is the largest value it can draw
    "randint": Sampler(_bounds(True, False), lambda a: [a["low"], a["high"] - 1], lambda _: 1,
                       _tune("randint"), "[low, high), integers, low < high"),
}


def sampler_help() -> str:
    return "; ".join(f"{name}: {s.help}" for name, s in SAMPLERS.items())


@dataclass(frozen=True)
class Dimension:
    key: str  # as in the request: "optimizer.lr" or "method_options.lambda|method_options.gamma"
    sampler: str
    args: Any

    @property
    def fields(self) -> list[str]:
        return self.key.split(JOINT)

    def assignments(self) -> list[dict[str, Any]]:
        """{field: value} for each value that must make a valid config."""
        fields = self.fields
        points = SAMPLERS[self.sampler].points(self.args)
        if len(fields) == 1:
            return [{fields[0]: value} for value in points]
        return [dict(zip(fields, value)) for value in points]

    def to_json(self) -> dict[str, Any]:
        return {self.sampler: self.args}


def parse_space(space: Any) -> list[Dimension]:
    """The request's search space as dimensions, or SpaceError naming each bad entry."""
    if not isinstance(space, dict) or not space:
        raise SpaceError([("search_space", "expected a non-empty mapping of config field -> "
                                           f"{{sampler: arguments}}; samplers: {sampler_help()}")])
    dims, problems = [], []
    for key, entry in space.items():
        where = f"search_space.{key}"
        if not isinstance(entry, dict) or len(entry) != 1:
            problems.append((where, "expected exactly one sampler, like {\"grid\": [1, 2]}; "
                                    f"samplers: {', '.join(SAMPLERS)}"))
            continue
        (name, args), = entry.items()
        sampler = SAMPLERS.get(name)
        if sampler is None:
            problems.append((where, f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}"))
            continue
        fields = key.split(JOINT)
        if any(not f or f.strip() != f for f in fields) or len(set(fields)) != len(fields):
            problems.append((where, "field paths must be non-empty, without spaces, and not "
                                    "repeat"))
            continue
        try:
            args = sampler.normalize(args)
            if len(fields) > 1:
                if name not in ("grid", "choice"):
                    raise ValueError(f"a joint dimension ({len(fields)} fields joined by "
                                     f"{JOINT!r}) takes grid or choice, not {name}")
                bad = [v for v in args if not isinstance(v, list) or len(v) != len(fields)]
                if bad:
                    raise ValueError(f"each value must be a list of {len(fields)} values (one "
                                     f"per field), got {bad[0]!r}")
        except ValueError as error:
            problems.append((where, f"{name}: {error}"))
            continue
        dims.append(Dimension(key, name, args))
    fields = [f for d in dims for f in d.fields]
    repeated = sorted({f for f in fields if fields.count(f) > 1})
    if repeated:
        problems.append(("search_space", f"fields appear in more than one dimension: "
                                         f"{', '.join(repeated)}"))
    if problems:
        raise SpaceError(problems)
    return dims


def grid_size(dims: list[Dimension]) -> int:
    return math.prod(SAMPLERS[d.sampler].size(d.args) for d in dims)


def tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """The Ray Tune param_space of a (validated) search space: one entry per dimension key."""
    return {d.key: SAMPLERS[d.sampler].tune(d.args) for d in parse_space(space)}


def assign(config: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """A copy of `config` with the dotted `field` set to `value` (nested mappings made as needed;
    a dict value is merged into an existing mapping)."""
    import copy
    out = copy.deepcopy(config)
    parts = field.split(".")
    node = out
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parts[:i + 1])} is {child!r}, not a mapping, so it "
                             f"has no field {parts[i + 1]!r}")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = {**node[last], **copy.deepcopy(value)}
    else:
        node[last] = copy.deepcopy(value)
    return out


def apply_sample(config: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    """The base config with one trial's sampled values ({dimension key: value}) set."""
    for key, value in sample.items():
        fields = key.split(JOINT)
        values = [value] if len(fields) == 1 else list(value)
        for field, item in zip(fields, values):
            config = assign(config, field, item)
    return config


def flat_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """{field: value} of a trial's sample, joint dimensions split into their fields."""
    out: dict[str, Any] = {}
    for key, value in sample.items():
        fields = key.split(JOINT)
        out.update({fields[0]: value} if len(fields) == 1 else dict(zip(fields, value)))
    return out


# -- schedulers -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SchedulerKind:
    """`normalize(args, epochs)` checks a request's scheduler arguments and fills defaults;
    `build(args, metric, mode)` makes the Ray Tune scheduler (None: Tune's FIFO)."""
    normalize: Callable[[dict, int], dict]
    build: Callable[[dict], Any]
    arguments: tuple[str, ...]
    help: str


def _int_arg(args: dict, name: str, default: int, low: int) -> int:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _asha_normalize(args: dict, epochs: int) -> dict:
    max_t = _int_arg(args, "max_t", epochs, 1)
    grace = _int_arg(args, "grace_period", 1, 1)
    factor = args.get("reduction_factor", 2)
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not factor > 1:
        raise ValueError(f"reduction_factor must be a number > 1, got {factor!r}")
    if grace > max_t:
        raise ValueError(f"grace_period ({grace}) is greater than max_t ({max_t})")
    if max_t > epochs:
        raise ValueError(f"max_t ({max_t}) is greater than the config's epochs ({epochs}); "
                         "ASHA's time unit is the epoch")
    return {"name": "asha", "max_t": max_t, "grace_period": grace,
            "reduction_factor": float(factor)}


def _asha_build(args: dict) -> Any:
    from ray.tune.schedulers import ASHAScheduler
    # time unit: the "epoch" of each per-epoch report. The final report (certified metrics) has
    # no "epoch", so ASHA ignores it; stop_last_trials=False so that reaching max_t does not stop
    # a trial before it is certified.
    return ASHAScheduler(time_attr="epoch", max_t=args["max_t"],
                         grace_period=args["grace_period"],
                         reduction_factor=args["reduction_factor"], stop_last_trials=False)


SCHEDULERS: dict[str, SchedulerKind] = {
    "none": SchedulerKind(lambda args, epochs: {"name": "none"}, lambda args: None, (),
                          "every trial runs to the end"),
    "asha": SchedulerKind(_asha_normalize, _asha_build,
                          ("max_t", "grace_period", "reduction_factor"),
                          "asynchronous successive halving over epochs: max_t (default: "
                          "epochs), grace_period (default 1), reduction_factor (default 2)"),
}


def parse_scheduler(request: Any, epochs: int) -> dict[str, Any]:
    """The request's scheduler in canonical form; None or {} means none."""
    if not request:
        return {"name": "none"}
    if not isinstance(request, dict):
        raise SpaceError([("scheduler", "expected a mapping like {\"name\": \"asha\", ...}")])
    name = request.get("name")
    kind = SCHEDULERS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise SpaceError([("scheduler.name", f"unknown scheduler {name!r}; known: "
                           + "; ".join(f"{n} ({k.help})" for n, k in SCHEDULERS.items()))])
    args = {k: v for k, v in request.items() if k != "name"}
    allowed = set(kind.arguments)
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise SpaceError([("scheduler", f"unknown arguments {unknown} for {name}; allowed: "
                           f"{', '.join(sorted(allowed)) or 'none'}")])
    try:
        return kind.normalize(args, epochs)
    except ValueError as error:
        raise SpaceError([("scheduler", f"{name}: {error}")]) from None


def build_scheduler(args: dict[str, Any]) -> Any:
    return SCHEDULERS[args["name"]].build(args)

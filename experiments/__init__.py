"""Experiment specs: one YAML file per paper table under this folder (`<paper>/<table>.yaml`), the
schema they follow (`experiments.schema`) and the loader the orchestrator and the API use.

    list_specs()                      -> ["demo/digits", "ibp/table3", "ibp/table4", ...]
    load_spec("ibp/table4")           -> TableSpec
    row_configs(spec, "quick", rows, seeds) -> [(row id, seed, config dict), ...]
    spec_summary(spec)                -> JSON-ready description (GET /experiments)

Configs are not validated against `RunConfig` here (this package imports no `workers`): the
orchestrator does that, and marks rows whose method or certifier is not implemented yet.
"""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .schema import (PROFILES, REQUIRED_CONFIG_FIELDS, Column, Paper, Reported, Row, Source,
                     SweepSpec, TableSpec, config_value, deep_merge, merged_config)

SPEC_ROOT = Path(__file__).resolve().parent
SUFFIX = ".yaml"
EXTENSION_PREFIX = "x-"

__all__ = [
    "PROFILES", "REQUIRED_CONFIG_FIELDS", "SPEC_ROOT", "Column", "Paper", "Reported", "Row",
    "Source", "SpecError", "SweepSpec", "TableSpec", "UnknownRow", "UnknownSpec", "deep_merge", "list_specs",
    "load_spec", "load_spec_file", "merged_config", "row_configs", "row_for_sample", "spec_summary", "sweep_base_config",
]


class SpecError(ValueError):
    """A spec file that is not valid YAML or does not follow the schema; the message names the
    file and each offending field."""


class UnknownSpec(ValueError):
    """No spec of that name; the message lists the known names."""


class UnknownRow(ValueError):
    """Row ids the spec does not have; the message lists the spec's row ids."""


def list_specs(root: str | Path | None = None) -> list[str]:
    """Names ('<paper>/<table>') of every spec file under root (default: this package), sorted."""
    base = Path(root) if root is not None else SPEC_ROOT
    return sorted(path.relative_to(base).with_suffix("").as_posix()
                  for path in base.rglob(f"*{SUFFIX}") if path.is_file())


def load_spec(name: str, root: str | Path | None = None) -> TableSpec:
    """The spec called `name` (e.g. 'ibp/table4')."""
    known = list_specs(root)
    if name not in known:
        raise UnknownSpec(f"unknown spec {name!r}; known: {', '.join(known) or 'none'}")
    base = Path(root) if root is not None else SPEC_ROOT
    return load_spec_file(base / f"{name}{SUFFIX}", expected_name=name)


def load_spec_file(path: str | Path, expected_name: str | None = None) -> TableSpec:
    """Parse and validate one spec file. `expected_name`: the name its path implies (its `name`
    field must equal it)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SpecError(f"{path}: cannot read: {error}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a mapping, got {type(data).__name__}")
    # Top-level keys starting with "x-" only hold YAML anchors (blocks that rows merge with `<<:`),
    # as in docker-compose files; they are not part of the spec.
    data = {key: value for key, value in data.items()
            if not (isinstance(key, str) and key.startswith(EXTENSION_PREFIX))}
    try:
        spec = TableSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(f"{path}: does not follow the spec schema:\n"
                        + "\n".join(_describe(error, data))) from None
    if expected_name is not None and spec.name != expected_name:
        raise SpecError(f"{path}: field 'name' is {spec.name!r} but the file's path makes it "
                        f"{expected_name!r}")
    return spec


def row_configs(spec: TableSpec, profile: str = "quick", rows: list[str] | None = None,
                seeds: list[int] | None = None) -> list[tuple[str, int, dict[str, Any]]]:
    """(row id, seed, config with `seed` set) for each selected row (in spec order) and seed.

    rows: None = every row. seeds: None = each row's own seeds, else the spec's (default [0]).
    The configs are merged (see `merged_config`) but not validated."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    known = [row.id for row in spec.rows]
    if rows is not None:
        unknown = [row_id for row_id in rows if row_id not in known]
        if unknown:
            raise UnknownRow(f"unknown rows {', '.join(map(repr, unknown))} in spec "
                             f"{spec.name!r}; rows: {', '.join(known)}")
        if not rows:
            raise UnknownRow(f"no rows selected from spec {spec.name!r}; rows: {', '.join(known)}")
    if seeds is not None:
        if not seeds or any((not isinstance(s, int)) or isinstance(s, bool) or s < 0
                            for s in seeds):
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    selected = [row for row in spec.rows if rows is None or row.id in rows]
    out = []
    for row in selected:
        for seed in list(dict.fromkeys(seeds or row.seeds or spec.seeds)):
            config = merged_config(spec, row, profile)
            config["seed"] = seed
            out.append((row.id, seed, config))
    return out


def sweep_base_config(spec: TableSpec, profile: str = "quick") -> dict[str, Any]:
    """The base config of a sweep spec for `profile`: the spec's defaults (and quick overrides);
    the search space supplies the swept fields."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    config = deep_merge(spec.defaults)
    return deep_merge(config, spec.quick) if profile == "quick" else config


def row_for_sample(spec: TableSpec, values: dict[str, Any]) -> str | None:
    """The id of the sweep spec's row whose config has these values of the swept row fields
    ({field: value}); None when no row matches."""
    if spec.sweep is None:
        return None
    for row in spec.rows:
        if all(_same(config_value(row.config, f), values.get(f)) for f in spec.sweep.row_fields):
            return row.id
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
    return a == b


def spec_summary(spec: TableSpec) -> dict[str, Any]:
    """What GET /experiments shows about a spec (JSON-ready)."""
    rows = []
    for row in spec.rows:
        configs = {profile: merged_config(spec, row, profile) for profile in PROFILES}
        methods = list(dict.fromkeys(c.get("method") for c in configs.values() if c.get("method")))
        certifiers = list(dict.fromkeys(name for c in configs.values()
                                        for name in (c.get("certifiers") or [])))
        rows.append({
            "id": row.id, "label": row.label, "group": row.group, "methods": methods,
            "certifiers": certifiers, "seeds": row.seeds or spec.seeds, "note": row.note,
            "reported": {key: rep.value for key, rep in row.reported.items()},
        })
    return {
        "name": spec.name,
        "paper": spec.paper.model_dump(),
        "caption": spec.caption,
        "notes": spec.notes,
        "columns": [column.model_dump() for column in spec.columns],
        "tolerance": spec.tolerance,
        "rows": rows,
        "profiles": list(PROFILES),
        "sweep": spec.sweep.model_dump() if spec.sweep is not None else None,
    }


def _describe(error: ValidationError, data: dict[str, Any]) -> list[str]:
    """One line per problem, with the field path (a row also shows its id); an unknown field
    lists the fields allowed there."""
    lines = []
    for item in error.errors():
        loc = list(item["loc"])
        parts: list[str] = []
        for i, part in enumerate(loc):
            if isinstance(part, int):
                label = f"{parts.pop() if parts else ''}[{part}]"
                row_id = _row_id(data, part) if loc[i - 1:i] == ["rows"] and i == 1 else None
                parts.append(label + (f"(id={row_id})" if row_id else ""))
            else:
                parts.append(str(part))
        path = ".".join(parts) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            model = _model_at(loc[:-1])
            message = "unknown field" + (f"; allowed: {', '.join(model.model_fields)}"
                                         if model is not None else "")
        elif item["type"] == "missing":
            message = "required field missing"
        lines.append(f"  {path}: {message}")
    return lines


def _model_at(loc: list) -> type[BaseModel] | None:
    """The schema model a ValidationError location points into (None if it is not a model)."""
    annotation: Any = TableSpec
    for part in loc:
        if isinstance(part, str) and _is_model(annotation):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        else:  # an index into a list, or a key of a dict: the element type
            args = typing.get_args(annotation)
            annotation = args[-1] if args else None
        annotation = _unwrap_optional(annotation)
    return annotation if _is_model(annotation) else None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _row_id(data: dict[str, Any], index: int) -> str | None:
    rows = data.get("rows")
    if isinstance(rows, list) and 0 <= index < len(rows) and isinstance(rows[index], dict):
        value = rows[index].get("id")
        return str(value) if value is not None else None
    return None


def adhoc_spec(config: dict[str, Any]) -> TableSpec:
    """A one-row table for a `run` job (no paper): clean, PGD and verified error per certifier."""
    columns = [Column(key="clean", label="Test error", metric="clean_acc"),
               Column(key="pgd", label="PGD error", metric="pgd_acc")]
    columns += [Column(key=f"verified_{name}", label=f"Verified error ({name})",
                       metric=f"verified_acc.{name}") for name in config.get("certifiers", [])]
    label = (f"{config.get('method')} {config.get('model')} on {config.get('dataset')}, "
             f"{config.get('norm')} eps={config.get('eps')}")
    return TableSpec(name="adhoc", paper=Paper(title="(no paper: a single run)", short="-"),
                     caption=label, columns=columns, tolerance=0.0,
                     rows=[Row(id="run", label=label)])

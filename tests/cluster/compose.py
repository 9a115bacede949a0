"""Reading docker-compose.yml the way Docker Compose does, for the tests (no Docker engine runs on
the build machines): `${VAR}` interpolation from an env file, YAML merge keys, and the `!reset`
tag of override files."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"
MULTIHOST_OVERRIDE = REPO / "docker-compose.multihost.yml"
ENV_EXAMPLE = REPO / ".env.example"

RESET = object()  # the value of a `!reset` node: remove the key when merging


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!reset", lambda loader, node: RESET)
_Loader.add_constructor("!override", lambda loader, node: loader.construct_object(node, deep=True))

_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})")


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}. A required variable that is missing raises KeyError with its message."""
    def replace(match: re.Match) -> str:
        if match.group(1):
            return "$"
        name, op, arg = match.group(2), match.group(3), match.group(4)
        value = env.get(name)
        if op in (":-", ":?") and value == "":
            value = None
        if value is not None:
            return value
        if op in ("-", ":-"):
            return arg
        if op in ("?", ":?"):
            raise KeyError(f"{name}: {arg}")
        return ""
    return _VARIABLE.sub(replace, text)


def load(path: Path, env: dict[str, str]) -> dict[str, Any]:
    return yaml.load(interpolate(path.read_text(), env), Loader=_Loader)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file: mappings merge key by key, `!reset` removes a key
    (sequences, which Compose appends, are not needed by these files)."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    merged = dict(base)
    for key, value in override.items():
        if value is RESET:
            merged.pop(key, None)
        else:
            merged[key] = merge(base.get(key), value) if key in base else value
    return merged


def environment(service: dict[str, Any], env_files: dict[str, dict[str, str]]) -> dict[str, str]:
    """A service's container environment: its env_file(s), then `environment` (which wins)."""
    result: dict[str, str] = {}
    files = service.get("env_file") or []
    for name in [files] if isinstance(files, str) else files:
        result.update(env_files[name if isinstance(name, str) else name["path"]])
    declared = service.get("environment") or {}
    if isinstance(declared, list):
        declared = dict(item.split("=", 1) for item in declared)
    result.update({key: str(value) for key, value in declared.items()})
    return result


def option(command: list[str], name: str) -> str:
    """The value of `--name VALUE` or `--name=VALUE` in a command list (the last one wins)."""
    value = None
    for i, word in enumerate(command):
        if word == name:
            value = command[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    if value is None:
        raise KeyError(f"{name} not in {command}")
    return value

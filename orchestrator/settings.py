"""Settings of the service, from the environment (one place; DESIGN.md "Conventions").

The embedded default needs nothing: state under CERTREPRO_HOME (./.certrepro), SQLite for the job
store, an MLflow server child process on SQLite, a local Ray.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str
    mlflow_tracking_uri: str | None  # None: start an MLflow server child process (embedded)
    mlflow_port: int
    ray_address: str | None  # None: start a local Ray in this process
    api_key: str | None
    runs_dir: Path  # row work folders (checkpoints); every Ray node must see the same path
    tune_dir: Path  # Ray Tune storage of sweeps; likewise the same path on every node
    lease_seconds: float = 30.0
    max_attempts: int = 3
    poll_seconds: float = 0.5
    # Ray re-runs a row whose node or worker process died (not one whose code raised) this many
    # times, on any node, from the row's last checkpoint; the dispatcher's attempts come after
    node_retries: int = 3
    # where a browser reaches the MLflow UI, when the tracking URI is an address inside a cluster
    # (http://mlflow:5000 in docker-compose); None: the tracking URI itself
    mlflow_public_url: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(os.environ.get("CERTREPRO_HOME", ".certrepro")).resolve()
        return cls(
            home=home,
            db_url=os.environ.get("CERTREPRO_DB_URL") or f"sqlite:///{home / 'jobs.db'}",
            mlflow_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
            mlflow_port=int(_env_float("CERTREPRO_MLFLOW_PORT", 5000)),
            mlflow_public_url=os.environ.get("CERTREPRO_MLFLOW_PUBLIC_URL") or None,
            ray_address=os.environ.get("RAY_ADDRESS") or None,
            api_key=os.environ.get("CERTREPRO_API_KEY") or None,
            runs_dir=Path(os.environ.get("CERTREPRO_RUNS_DIR") or home / "runs").resolve(),
            tune_dir=Path(os.environ.get("CERTREPRO_TUNE_DIR") or home / "tune").resolve(),
            lease_seconds=_env_float("CERTREPRO_LEASE_SECONDS", 30.0),
            max_attempts=int(_env_float("CERTREPRO_MAX_ATTEMPTS", 3)),
            poll_seconds=_env_float("CERTREPRO_POLL_SECONDS", 0.5),
            node_retries=int(_env_float("CERTREPRO_NODE_RETRIES", 3)),
        )

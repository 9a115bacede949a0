"""The wiring of docker-compose.yml, checked without a Docker engine: every service's dependencies,
healthchecks and ports, the settings the code reads (orchestrator/settings.py) set consistently
across services, and images built from files that exist."""
from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mlflow.server.security_utils import is_allowed_host_header
from packaging.requirements import Requirement
from sqlalchemy.engine import make_url

from orchestrator.db import normalize_url
from orchestrator.settings import Settings
from orchestrator.tracking import MLflowTracker

from .compose import (COMPOSE, CPU_OVERRIDE, ENV_EXAMPLE, MULTIHOST_OVERRIDE, REPO, environment,
                      interpolate, load, merge, option, read_env_file)

SERVICES = {"postgres", "mlflow-db-upgrade", "mlflow", "ray-head", "ray-worker", "api"}
ONE_SHOT = {"mlflow-db-upgrade"}
RAY_IMAGE_SERVICES = ("ray-head", "ray-worker", "api")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)  # what `make cluster-up` copies to .env


@pytest.fixture(scope="module")
def services(env) -> dict[str, dict]:
    return load(COMPOSE, env)["services"]


def container_env(services, env, name: str) -> dict[str, str]:
    return environment(services[name], {".env": env})


def test_services_and_their_dependencies(services):
    assert set(services) == SERVICES
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}"
            elif condition == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", dependency
            else:
                pytest.fail(f"{name} -> {dependency}: {condition} does not wait for readiness")

    def needs(name):
        return {dep: rule["condition"] for dep, rule in (services[name].get("depends_on") or {}).items()}

    assert needs("mlflow-db-upgrade") == {"postgres": "service_healthy"}
    assert needs("mlflow") == {"mlflow-db-upgrade": "service_completed_successfully"}
    assert needs("ray-worker") == {"ray-head": "service_healthy"}
    assert needs("api") == {"postgres": "service_healthy", "mlflow": "service_healthy",
                            "ray-head": "service_healthy"}
    # the one-shot upgrade runs the MLflow version of the server, on the server's database
    upgrade, server = services["mlflow-db-upgrade"], services["mlflow"]
    assert upgrade["image"] == server["image"] and upgrade["build"] == server["build"]
    assert upgrade["command"][:3] == ["mlflow", "db", "upgrade"]
    assert upgrade["command"][3] == option(server["command"], "--backend-store-uri")


def healthcheck_urls(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", test
    return [word for word in test[1:] if word.startswith("http")]


def test_every_long_running_service_has_a_healthcheck_on_its_own_ports(services, env):
    for name in SERVICES - ONE_SHOT:
        assert "healthcheck" in services[name], name
        assert services[name].get("restart") == "unless-stopped", name
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"

    mlflow_port = option(services["mlflow"]["command"], "--port")
    head_env = container_env(services, env, "ray-head")
    api_env = container_env(services, env, "api")
    expected = {
        "mlflow": [f"http://127.0.0.1:{mlflow_port}/health"],
        "ray-head": [f"http://127.0.0.1:{head_env['RAY_DASHBOARD_PORT']}/api/gcs_healthz",
                     "http://127.0.0.1:52365/api/local_raylet_healthz"],  # the node's agent
        "ray-worker": ["http://127.0.0.1:52365/api/local_raylet_healthz"],
        "api": [f"http://127.0.0.1:{api_env['CERTREPRO_PORT']}/readyz"],
    }
    for name, urls in expected.items():
        assert services[name]["healthcheck"]["test"][1] == "certrepro-healthcheck", name
        assert healthcheck_urls(services[name]) == urls, name

    # the Ray endpoints are the dashboard's and its per-node agent's (ray[default], in the image):
    # routes and the agent's default port of the Ray version installed here
    import ray
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

    assert DEFAULT_DASHBOARD_AGENT_LISTEN_PORT == 52365
    routes = "".join(path.read_text(errors="replace")
                     for path in (Path(ray.__file__).parent / "dashboard").rglob("*.py"))
    for route in ("/api/gcs_healthz", "/api/local_raylet_healthz"):
        assert f'@routes.get("{route}")' in routes, route


def published(service: dict) -> dict[str, str]:
    """container port -> host address:port."""
    result = {}
    for spec in service.get("ports", []):
        host, _, container = str(spec).rpartition(":")
        result[container] = host
    return result


def test_published_ports_reach_what_listens_inside(services, env):
    bind = env["CERTREPRO_BIND"]
    api_env = container_env(services, env, "api")
    assert published(services["api"]) == {api_env["CERTREPRO_PORT"]: f"{bind}:8000"}
    assert published(services["mlflow"]) == {
        option(services["mlflow"]["command"], "--port"): f"{bind}:5000"}
    head_env = container_env(services, env, "ray-head")
    assert published(services["ray-head"]) == {head_env["RAY_DASHBOARD_PORT"]: f"{bind}:8265"}
    for name in ("postgres", "ray-worker", "mlflow-db-upgrade"):
        assert not published(services[name]), f"{name} is reached on the compose network only"
    assert option(services["mlflow"]["command"], "--host") == "0.0.0.0"


def test_the_settings_the_code_reads_are_set_and_consistent(services, env, monkeypatch):
    postgres = services["postgres"]["environment"]
    api_env = container_env(services, env, "api")
    for name in list(api_env) + ["CERTREPRO_HOME", "CERTREPRO_MLFLOW_PORT"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in api_env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()

    # the job store: PostgreSQL's own database, user and password
    db = make_url(normalize_url(settings.db_url))
    assert (db.get_backend_name(), db.host, db.port) == ("postgresql", "postgres", 5432)
    assert db.database == postgres["POSTGRES_DB"] == "jobs"
    assert (db.username, db.password) == (postgres["POSTGRES_USER"], env["POSTGRES_PASSWORD"])

    # MLflow's store: the other database, created by the init script the postgres service mounts
    backend = make_url(option(services["mlflow"]["command"], "--backend-store-uri"))
    assert (backend.host, backend.username, backend.password) == (db.host, db.username, db.password)
    assert backend.database == "mlflow" != db.database
    init_mounts = [v.split(":") for v in services["postgres"]["volumes"]
                   if "/docker-entrypoint-initdb.d/" in v]
    assert len(init_mounts) == 1
    init_sql = (REPO / init_mounts[0][0]).read_text()
    assert f"CREATE DATABASE {backend.database};" in init_sql

    # the MLflow server the rows and the API use, and that it answers their Host header
    tracking = urlsplit(settings.mlflow_tracking_uri)
    assert tracking.hostname == "mlflow" and str(tracking.port) == option(
        services["mlflow"]["command"], "--port")
    allowed = option(services["mlflow"]["command"], "--allowed-hosts").split(",")
    assert is_allowed_host_header(allowed, tracking.netloc)
    assert is_allowed_host_header(allowed, "localhost:5000")  # the published port, in a browser
    # the links the API hands out point at that published port, not at the in-cluster name
    public = urlsplit(settings.mlflow_public_url)
    assert public.hostname == "localhost" and public.port == int(env["MLFLOW_PUBLISHED_PORT"])
    assert MLflowTracker(settings.mlflow_tracking_uri, settings.mlflow_public_url).ui_base == \
        settings.mlflow_public_url
    assert not is_allowed_host_header(allowed, "evil.example:5000")
    assert "--serve-artifacts" in services["mlflow"]["command"]
    artifacts = option(services["mlflow"]["command"], "--artifacts-destination")
    assert any(v.endswith(f":{artifacts}") for v in services["mlflow"]["volumes"])

    # Ray: the head's GCS port
    head_env = container_env(services, env, "ray-head")
    assert settings.ray_address == f"ray-head:{head_env['RAY_PORT']}"
    # the API key comes from the env file, not from the compose file
    assert settings.api_key == env["CERTREPRO_API_KEY"]
    assert "CERTREPRO_API_KEY" not in (services["api"].get("environment") or {})

    # one shared volume at the same path on every Ray node and the API, holding the row
    # checkpoints and the Tune storage; every node sees the same settings
    for name in RAY_IMAGE_SERVICES:
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert mounts.get("/shared") == "shared", name
        node_env = container_env(services, env, name)
        for key in ("CERTREPRO_RUNS_DIR", "CERTREPRO_TUNE_DIR", "CERTREPRO_DATA",
                    "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            assert node_env[key] == api_env[key], (name, key)
    # Ray's token authentication on every node, the token from the env file
    assert api_env["RAY_AUTH_MODE"] == "token" and api_env["RAY_AUTH_TOKEN"] == env["RAY_AUTH_TOKEN"]
    for path in (settings.runs_dir, settings.tune_dir, Path(api_env["CERTREPRO_DATA"])):
        assert path.is_relative_to("/shared"), path
    assert "shared" in load(COMPOSE, env)["volumes"]


def test_required_variables_come_from_the_env_file(env):
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert required == {"POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"} and required <= set(env)
    for name in required:  # without it, Compose refuses to start and names it
        with pytest.raises(KeyError, match=name):
            interpolate(text, {key: value for key, value in env.items() if key != name})


def dockerfile(path: Path) -> tuple[dict[str, str], list[list[str]]]:
    """ARG defaults and COPY instructions (as word lists) of a Dockerfile."""
    args, copies = {}, []
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "ARG" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            args[key] = value
        elif words[0] == "COPY":
            copies.append([w for w in words[1:] if not w.startswith("--")])
    return args, copies


def ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
               or fnmatch.fnmatch(Path(prefix).name, pattern.removeprefix("**/"))
               for prefix in prefixes for pattern in patterns)


def test_images_are_built_from_files_that_exist(services):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert {".git", ".venv", ".env"} <= set(patterns)
    builds = {}
    for name, service in services.items():
        if "build" not in service:
            continue
        context = REPO / service["build"]["context"]
        path = context / service["build"]["dockerfile"]
        assert path.is_file(), f"{name}: {path}"
        builds[service["image"]] = path
        _, copies = dockerfile(path)
        for *sources, _target in copies:
            for source in sources:
                assert (context / source).exists(), f"{path.name}: COPY {source}"
                assert not ignored(source, patterns), f"{path.name}: {source} is in .dockerignore"
    # one image for the Ray nodes and the API (same Python, Ray, torch everywhere), one for MLflow
    assert len({services[n]["image"] for n in RAY_IMAGE_SERVICES}) == 1
    assert len(builds) == 2

    ray_args, _ = dockerfile(REPO / "docker" / "Dockerfile")
    mlflow_args, _ = dockerfile(REPO / "docker" / "mlflow.Dockerfile")
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = {Requirement(r).name: Requirement(r) for r in dependencies}
    # the pinned torch, in its CUDA build
    assert str(requirements["torch"].specifier) == f"=={ray_args['TORCH_VERSION']}"
    assert ray_args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    assert requirements["ray"].specifier.contains(ray_args["RAY_VERSION"])
    assert requirements["mlflow"].specifier.contains(ray_args["MLFLOW_VERSION"])
    assert mlflow_args["MLFLOW_VERSION"] == ray_args["MLFLOW_VERSION"]  # client = server
    assert mlflow_args["PYTHON_VERSION"] == ray_args["PYTHON_VERSION"]
    # the image knows its commit (no .git inside): a build arg the compose file passes on
    assert "GIT_COMMIT" in ray_args
    assert "CERTREPRO_GIT_COMMIT=${GIT_COMMIT}" in (REPO / "docker" / "Dockerfile").read_text()
    for name in RAY_IMAGE_SERVICES:
        assert services[name]["build"]["args"]["GIT_COMMIT"] == "unknown"  # make sets the real one


def test_the_commands_name_roles_the_entrypoint_has(services):
    entrypoint = REPO / "docker" / "entrypoint.sh"
    subprocess.run(["sh", "-n", str(entrypoint)], check=True)
    roles = set(re.findall(r"^\s{4}([a-z-]+)\)$", entrypoint.read_text(), re.M))
    assert roles == {"ray-head", "ray-worker", "api"}
    for name in RAY_IMAGE_SERVICES:
        assert services[name]["command"][0] in roles
    assert services["ray-head"]["shm_size"] and services["ray-worker"]["shm_size"]


def test_workers_reserve_gpus_and_the_cpu_override_removes_only_that(services, env):
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert not any("deploy" in services[n] for n in SERVICES - {"ray-worker"})
    assert "container_name" not in services["ray-worker"]  # `--scale ray-worker=N` needs that

    cpu = merge(load(COMPOSE, env), load(CPU_OVERRIDE, env))["services"]
    assert "deploy" not in cpu["ray-worker"]
    assert {k: v for k, v in services["ray-worker"].items() if k != "deploy"} == cpu["ray-worker"]
    assert {n: s for n, s in cpu.items() if n != "ray-worker"} == {
        n: s for n, s in services.items() if n != "ray-worker"}


def test_the_multihost_override_shares_the_network_and_the_volume(env):
    base = load(COMPOSE, env)
    with pytest.raises(KeyError, match="CERTREPRO_NFS_SERVER"):
        load(MULTIHOST_OVERRIDE, env)  # refused without the NFS export
    nfs = env | {"CERTREPRO_NFS_SERVER": "10.0.0.5", "CERTREPRO_NFS_EXPORT": "/export/certrepro"}
    merged = merge(base, load(MULTIHOST_OVERRIDE, nfs))
    # an overlay network that containers on other machines join, so `ray-head` and `mlflow`
    # resolve there; and /shared on NFS, the same storage on every machine
    assert merged["networks"]["default"] == {"name": "certrepro", "external": True}
    assert merged["volumes"]["shared"]["driver_opts"] == {
        "type": "nfs", "o": "addr=10.0.0.5,rw,nfsvers=4", "device": ":/export/certrepro"}
    assert merged["services"] == base["services"]
    assert {k: v for k, v in merged["volumes"].items() if k != "shared"} == {
        k: v for k, v in base["volumes"].items() if k != "shared"}


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_writes_an_env_file_with_generated_secrets(tmp_path):
    for name in ("Makefile", ".env.example"):
        shutil.copy(REPO / name, tmp_path / name)
    subprocess.run(["make", "-s", ".env"], cwd=tmp_path, check=True, capture_output=True)
    written, example = read_env_file(tmp_path / ".env"), read_env_file(ENV_EXAMPLE)
    assert set(written) == set(example)
    secrets = ("POSTGRES_PASSWORD", "CERTREPRO_API_KEY", "RAY_AUTH_TOKEN")
    for key in secrets:
        assert example[key] == "change-me" and len(written[key]) >= 20
        assert re.fullmatch(r"[A-Za-z0-9_-]+", written[key])  # safe inside a URL
    assert len({written[key] for key in secrets}) == len(secrets)
    assert {k: v for k, v in written.items() if k not in secrets} == {
        k: v for k, v in example.items() if k not in secrets}
    dry_run = subprocess.run(["make", "-n", "cluster-up", "CPU=1", "WORKERS=3"], cwd=tmp_path,
                             check=True, capture_output=True, text=True).stdout
    assert ("docker compose -f docker-compose.yml -f docker-compose.cpu.yml up -d --build "
            "--scale ray-worker=3") in dry_run

"""The `certrepro` command line. Each subcommand registers its arguments and its handler in
COMMANDS; bad input ends with a message naming what was wrong and exit status 2, no traceback and
nothing written."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from workers.core.config import RunConfig, config_hash, describe_errors, resolve
from workers.core.data import DataNotFound
from workers.core.registry import RegistryError
from workers.files import write_json

from .client import ApiError


class UsageError(Exception):
    """Bad input from the user: printed as is, exit status 2."""


def home() -> Path:
    return Path(os.environ.get("CERTREPRO_HOME", ".certrepro"))


# -- turning files and flags into a validated config ---------------------------------------------

# flag -> config field, for `certrepro run` (DESIGN.md "Interfaces")
RUN_FLAGS = {
    "method": str, "dataset": str, "model": str, "norm": str, "eps": float, "eps_train": float,
    "epochs": int, "batch_size": int, "seed": int, "device": str, "test_limit": int,
    "train_limit": int, "data_root": str,
}


def read_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise UsageError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def apply_override(config: dict[str, Any], assignment: str) -> None:
    """`--set optimizer.lr=0.01`: dotted path = YAML value."""
    if "=" not in assignment:
        raise UsageError(f"--set needs FIELD=VALUE (dotted fields allowed), got {assignment!r}")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    target = config
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise UsageError(f"--set {path}: {key} is not a group of fields")
    target[keys[-1]] = yaml.safe_load(raw)


def validated(data: dict[str, Any], what: str = "config") -> RunConfig:
    try:
        return resolve(RunConfig.model_validate(data))
    except ValidationError as error:
        lines = "\n".join(f"  {line}" for line in describe_errors(error))
        raise UsageError(f"invalid {what}:\n{lines}") from None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    data = read_yaml(args.config) if args.config else {}
    for name in RUN_FLAGS:
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.certifier:
        data["certifiers"] = args.certifier
    for assignment in args.set or []:
        apply_override(data, assignment)
    return validated(data)


# -- output ---------------------------------------------------------------------------------------

def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A small text table: one line per (name, result)."""
    certifiers = sorted({c for _, r in rows for c in r["metrics"]["verified_acc"]})
    header = ["row", "method", "model", "eps", "clean", "pgd"] + \
        [f"verified[{c}]" for c in certifiers] + ["s/epoch"]
    lines = [header]
    for name, result in rows:
        config, metrics = result["config"], result["metrics"]
        epochs = result["timing"].get("sec_per_epoch") or []
        lines.append([
            name, config["method"], config["model"], f"{config['norm']}={config['eps']:g}",
            f"{metrics['clean_acc']:.1%}", f"{metrics['pgd_acc']:.1%}",
            *[f"{metrics['verified_acc'][c]:.1%}" if c in metrics["verified_acc"] else "-"
              for c in certifiers],
            f"{sum(epochs) / len(epochs):.2f}" if epochs else "-",
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in lines)


# -- subcommands ----------------------------------------------------------------------------------

def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config (flags override its fields)")
    for name, kind in RUN_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None)
    parser.add_argument("--certifier", action="append", help="repeat for several certifiers")
    parser.add_argument("--set", action="append", metavar="FIELD=VALUE",
                        help="any config field, dotted for groups: --set optimizer.lr=0.01")
    parser.add_argument("--out", help="result JSON (default: <workdir>/result.json)")
    parser.add_argument("--workdir", help="checkpoint folder (default: "
                        "$CERTREPRO_HOME/runs/<config hash>; a rerun there resumes)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_run(args: argparse.Namespace) -> int:
    from workers.runner import run_row  # heavy imports only once the input is valid
    config = config_from_args(args)
    workdir = Path(args.workdir) if args.workdir else home() / "runs" / config_hash(config)
    if args.fresh and (workdir / "checkpoint.pt").exists():
        (workdir / "checkpoint.pt").unlink()
    result = run_row(config, workdir, show_progress=not args.quiet)
    out = Path(args.out) if args.out else workdir / "result.json"
    if args.out:
        write_json(out, result)
    print(format_table([(config.method, result)]))
    print(f"result: {out}\ncheckpoint: {result['checkpoint']}")
    return 0


def add_certify_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint.pt written by `certrepro run`")
    parser.add_argument("--dataset", help="default: the data set it was trained on")
    parser.add_argument("--data-root", dest="data_root")
    parser.add_argument("--norm", choices=["linf", "l2"])
    parser.add_argument("--eps", type=float)
    parser.add_argument("--certifier", action="append")
    parser.add_argument("--test-limit", dest="test_limit", type=int)
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--set", action="append", metavar="FIELD=VALUE")
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--quiet", action="store_true")


def cmd_certify(args: argparse.Namespace) -> int:
    from workers.core.train import load_checkpoint
    from workers.runner import certify_checkpoint
    if not Path(args.checkpoint).is_file():
        raise UsageError(f"checkpoint {args.checkpoint} does not exist")
    try:
        state = load_checkpoint(args.checkpoint)
    except Exception as error:  # a foreign or truncated file: say so, no traceback
        raise UsageError(f"{args.checkpoint} is not a readable checkpoint: {error}") from None
    if not isinstance(state, dict) or "config" not in state:
        raise UsageError(f"{args.checkpoint} is not a certrepro checkpoint (no 'config')")
    overrides: dict[str, Any] = {}
    for name in ("dataset", "data_root", "norm", "eps", "test_limit", "device"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.certifier:
        overrides["certifiers"] = args.certifier
    for assignment in args.set or []:
        apply_override(overrides, assignment)
    validated({**state["config"], **overrides}, "certify settings")  # fail before any work
    result = certify_checkpoint(args.checkpoint, overrides, show_progress=not args.quiet)
    write_json(Path(args.out), result)
    print(format_table([("certify", result)]))
    print(f"result: {args.out}")
    return 0


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default="demo/digits", help="the table to run")
    parser.add_argument("--port", type=int, default=0, help="API port (default: a free one)")


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded service end to end: start it, submit the table, follow it, print the table,
    stop it."""
    import signal
    import socket
    import subprocess

    from .client import Client, follow

    port = args.port
    if not port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    home().mkdir(parents=True, exist_ok=True)
    log_path = home() / "demo-service.log"
    print(f"starting the service (log: {log_path}) ...", flush=True)
    service = subprocess.Popen([sys.executable, "-m", "certrepro", "serve", "--port", str(port)],
                               stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    try:
        client = Client(f"http://127.0.0.1:{port}")
        try:
            ready = client.wait_ready(timeout=180)
        except ApiError:
            raise UsageError(f"the service did not start; its log:\n{log_path.read_text()[-2000:]}")
        job = client.submit({"kind": "table", "spec": args.spec, "profile": "quick"})
        print(f"submitted {args.spec} as job {job['id']}", flush=True)
        job = follow(client, job["id"])
        print()
        print(client.table(job["id"], "md"))
        print(f"\nMLflow UI (while the service runs): {ready['mlflow_tracking_uri']}\n"
              f"  parent run of this job: {job.get('mlflow_url')}\n"
              "  `certrepro serve` brings the service and its MLflow UI back up.")
        return 0 if job["status"] == "succeeded" else 1
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(60)
        except subprocess.TimeoutExpired:
            service.kill()
        print("service stopped", flush=True)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the local Ray (embedded default only)")


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from api.app import create_app
    from orchestrator.service import Service

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("certrepro").setLevel(logging.INFO)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # A dead MLflow server must not hang a worker for minutes in client retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    service = Service(num_cpus=args.num_cpus)

    def announce() -> None:  # after the service started: its URLs are known
        print(f"certrepro API:  http://{args.host}:{args.port}  (docs: /docs)\n"
              f"MLflow UI:      {service.mlflow_uri}\n"
              f"job store:      {service.settings.db_url}\n"
              f"state folder:   {service.settings.home}", flush=True)

    app = create_app(service, manage_service=True, on_started=announce)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the service (default: $CERTREPRO_URL or "
                        "http://127.0.0.1:8000); the API key comes from $CERTREPRO_API_KEY")


def add_submit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?",
                        help="a table spec name (e.g. ibp/table4) or a run config YAML")
    parser.add_argument("--sweep", metavar="SWEEP.yaml",
                        help="submit a sweep: a YAML with the sweep job's fields (config or "
                             "spec [and row], search_space, metric, mode, num_samples, scheduler, "
                             "max_concurrent_trials, resources_per_trial)")
    parser.add_argument("--profile", choices=["quick", "paper", "smoke"], default="quick")
    parser.add_argument("--rows", help="comma-separated row ids of the table (default: all)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--idempotency-key")
    parser.add_argument("--follow", action="store_true", help="show progress until it ends")
    add_client_args(parser)


def cmd_submit(args: argparse.Namespace) -> int:
    from .client import Client, follow, format_status
    if args.sweep:
        if args.what:
            raise UsageError("give either a table or run config, or --sweep SWEEP.yaml")
        body = {**read_yaml(args.sweep), "kind": "sweep"}
    elif not args.what:
        raise UsageError("nothing to submit: give a table spec name, a run config YAML or "
                         "--sweep SWEEP.yaml")
    elif args.what.endswith((".yaml", ".yml")):
        body = {"kind": "run", "config": read_yaml(args.what)}
    else:
        try:
            seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        except ValueError:
            raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        body = {"kind": "table", "spec": args.what, "profile": args.profile, "seeds": seeds}
        if args.rows:
            body["rows"] = [row.strip() for row in args.rows.split(",") if row.strip()]
    client = Client(args.url)
    job = client.submit(body, args.idempotency_key)
    size = (f"{job['sweep']['trials']} trials" if job["kind"] == "sweep"
            else f"{len(job['rows'])} rows")
    print(f"submitted job {job['id']} ({size})")
    if args.follow:
        job = follow(client, job["id"])
        print(client.table(job["id"], "md"))
    else:
        print(format_status(job))
    return 0 if job["status"] != "failed" else 1


def add_status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job")
    parser.add_argument("--follow", action="store_true")
    add_client_args(parser)


def cmd_status(args: argparse.Namespace) -> int:
    from .client import Client, follow, format_status
    client = Client(args.url)
    if args.follow:
        follow(client, args.job)
    else:
        print(format_status(client.job(args.job)))
    return 0


def add_table_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job")
    parser.add_argument("--format", choices=["md", "csv", "latex", "html", "json"], default="md")
    add_client_args(parser)


def cmd_table(args: argparse.Namespace) -> int:
    from .client import Client
    print(Client(args.url).table(args.job, args.format))
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "serve": ("run the service: API, dispatcher, Ray, MLflow", add_serve_args, cmd_serve),
    "submit": ("submit a table or a run config to the service", add_submit_args, cmd_submit),
    "status": ("show a job's rows (a sweep's trials) and progress", add_status_args, cmd_status),
    "table": ("print a job's table beside the paper's numbers", add_table_args, cmd_table),
    "run": ("train, certify and write the result JSON", add_run_args, cmd_run),
    "certify": ("certify a saved checkpoint", add_certify_args, cmd_certify),
    "demo": ("start the service, run the demo table (nominal, PGD, IBP on digits), print it",
             add_demo_args, cmd_demo),
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="certrepro", description="certrepro: reproduce the tables "
                                   "of certified-robustness papers")
    sub = root.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, handler) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_args(command)
        command.set_defaults(handler=handler)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, RegistryError, DataNotFound, ApiError) as error:
        print(f"certrepro {args.command}: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if "cuda" not in str(error).lower():
            raise
        print(f"certrepro {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ncertrepro {args.command}: interrupted; rerun the same command to resume "
              "from the last checkpoint", file=sys.stderr)
        return 130

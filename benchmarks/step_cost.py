"""Cost of ONE training step of each method relative to `nominal`, side by side in one run.

A step is what the trainer does per batch (workers/core/train.py): the method's loss, then
`zero_grad`, `backward` and an Adam `step`. Rows per model:

- `nominal`      plain cross-entropy (the 1.00x reference)
- `pgd`          cross-entropy on 7-step PGD points (the method's default)
- `ibp pure`     IBP with kappa = 0: the interval pass and its backward only (the method skips
                 the nominal pass when kappa == 0)
- `ibp mixed`    IBP with kappa = 0.5: nominal pass + interval pass
- `crown_ibp pure` CROWN-IBP with kappa = 0 and beta = 1: interval pass + CROWN backward pass
- `cap k=50`     Wong et al.'s CAP (Fast-Lin) with 50 random projections for the intermediate
                 bounds, as 003 trains its non-"Exact" models (`--rows` to pick it, e.g. on
                 `--models small,medium`: it is the slowest row by far)
- `lmt`, `gloro`, `bcp`, `local_lip_b`  the Lipschitz methods at l_2 eps 36/255 with lambda = 1
                 (robust loss only), 2 power steps; a second table gives them over nominal and
                 over `ibp pure` with the targets BCP <= 1.5x IBP and Local-Lip <= 1.5x BCP
                 (`--rows` runs a subset; nominal and `ibp pure` are always kept)

on CIFAR-10-shaped input (3x32x32, 10 classes, the data set's Normalize as first layer), random
pixels in [0, 1] and random labels, so no data files are needed. The methods run round-robin
(one step of each in turn) so that machine noise hits all of them alike; each reported figure
is the median over the timed steps. On CUDA the device is synchronized around each timed step,
and the peak memory of the step is read with `torch.cuda.max_memory_allocated` after
`torch.cuda.reset_peak_memory_stats`; on the CPU there is no reliable per-step figure ("n/a").

Usage (from the repository root):
    PYTHONPATH=. python benchmarks/step_cost.py [--device cuda] [--repeats 30] [--json out.json]

Only public torch APIs of torch >= 2.2; imports nothing of Ray, MLflow or FastAPI.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from workers.core.bounds import PerturbationSet
from workers.core.config import RunConfig, resolve
from workers.core.data import dataset_info
from workers.core.methods import METHODS, StepState
from workers.core.models import build_model, count_parameters

DATASET = "cifar10"
EPS = 8 / 255
T_FINAL = 100.0  # training progress far past warm-up and ramp-up: schedules at final values

# (row label, method name, method_options)
ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("nominal", "nominal", {}),
    ("pgd", "pgd", {}),
    ("ibp pure", "ibp", {"kappa_start": 0.0, "kappa_final": 0.0}),
    ("ibp mixed", "ibp", {"kappa_start": 0.5, "kappa_final": 0.5}),
    # CROWN-IBP at its most expensive (beta = 1: the backward pass every step, kappa = 0)
    ("crown_ibp pure", "crown_ibp", {"kappa_start": 0.0, "kappa_final": 0.0,
                                     "beta_start": 1.0, "beta_final": 1.0}),
    ("cap k=50", "cap", {"projections": 50}),
]

# Lipschitz methods (issue 5): l_2 at eps = 36/255 (BCP / Local-Lip CIFAR-10), lambda = 1 (the
# robust loss alone, no clean pass), the default 2 power steps per training step; local_lip_b
# reads and writes its per-example iterate vectors (host memory, float16) as in training.
L2_EPS = 36 / 255
LIPSCHITZ_ROWS = ("lmt", "gloro", "bcp", "local_lip_b")
ROWS += [(name, name, {}) for name in LIPSCHITZ_ROWS]
LIPSCHITZ_TARGETS = {"bcp": ("ibp pure", 1.5), "local_lip_b": ("bcp", 1.5)}

# Targets from the issue and reference figures, printed beside the ratios.
TARGETS = {"ibp pure": 2.2, "ibp mixed": 3.2}
REFERENCES = [
    "IBP paper (Gowal et al.): 2.3x nominal (3.5 s vs 1.5 s per epoch)",
    "auto_LiRPA on these machines: 3.05x nominal for pure IBP",
]


@dataclass
class Row:
    label: str
    method_name: str
    options: dict[str, Any]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    method: Any
    times_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)  # absolute peak during the step
    step_bytes: list[int] = field(default_factory=list)  # peak minus what was allocated before
    saved_bytes: int | None = None  # tensors the loss keeps for backward (any device)
    stat_keys: list[str] = field(default_factory=list)
    steps: int = 0  # steps taken so far (the StepState's position in the epoch)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="medium,4C3F",
                        help="comma-separated model names (default: medium,4C3F)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", default=None, help="write the figures here")
    parser.add_argument("--profile", metavar="ROW", default=None,
                        help="after timing, profile a few steps of this row (e.g. 'ibp pure') "
                             "on the first model with torch.profiler and print the top ops")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row labels to run (default: all); nominal and "
                             "'ibp pure' are always kept as the references")
    args = parser.parse_args(argv)
    if args.rows is not None:
        labels = {label for label, _, _ in ROWS}
        args.rows = {r.strip() for r in args.rows.split(",") if r.strip()} | {"nominal", "ibp pure"}
        if args.rows - labels:
            parser.error(f"--rows: unknown {', '.join(sorted(args.rows - labels))}; "
                         f"rows: {', '.join(label for label, _, _ in ROWS)}")
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch-size and --repeats must be >= 1, --warmup >= 0")
    if args.profile is not None and args.profile not in {label for label, _, _ in ROWS}:
        parser.error(f"--profile: unknown row {args.profile!r}; "
                     f"rows: {', '.join(label for label, _, _ in ROWS)}")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:  # platform.processor() is often empty or just the architecture on Linux
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def make_config(method: str, model: str, options: dict[str, Any], batch_size: int,
                device: torch.device) -> RunConfig:
    return resolve(RunConfig(
        method=method, dataset=DATASET, model=model, eps=EPS, eps_train=EPS,
        batch_size=batch_size, device=device.type, method_options=options,
        schedule={"warmup_epochs": 0, "rampup_epochs": 0}))


def make_rows(model_name: str, base: torch.nn.Module, batch_size: int,
              device: torch.device) -> list[Row]:
    rows = []
    for label, method_name, options in ROWS:
        config = make_config(method_name, model_name, options, batch_size, device)
        method = METHODS.get(method_name)(config)
        if hasattr(method, "kappa"):  # the row must measure the kappa it claims to
            kappa = method.kappa(T_FINAL)
            assert kappa == options.get("kappa_final", 0.0), (label, kappa)
        model = copy.deepcopy(base).to(device).train()  # same initial weights for every row
        optimizer = torch.optim.Adam(model.parameters(), lr=config.optimizer.lr)
        rows.append(Row(label, method_name, options, model, optimizer, method))
    return rows


def row_state(row: Row, x: torch.Tensor, state: StepState) -> StepState:
    if row.method_name in LIPSCHITZ_ROWS:  # their own threat model; example positions for the store
        return StepState(state.t, L2_EPS, PerturbationSet("l2", L2_EPS), state.generator,
                         torch.arange(len(x)))
    return state


def step(row: Row, x: torch.Tensor, y: torch.Tensor, state: StepState) -> dict[str, Any]:
    """One training step, exactly as the trainer does it: the row's steps count up through an
    epoch, so statistics a method takes only now and then cost what they cost on average."""
    state = replace(row_state(row, x, state), step=row.steps)
    row.steps += 1
    loss, stats = row.method.loss(row.model, x, y, state)
    row.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    row.optimizer.step()
    return stats


def saved_for_backward(row: Row, x: torch.Tensor, y: torch.Tensor, state: StepState) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one loss: the
    memory a training step holds at its peak beyond the weights, measured the same way on any
    device (on CUDA the allocator's peak is reported beside it)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        # Detached: a saved output returned as-is would hold its own grad_fn, a cycle through
        # C++ that Python's gc cannot see, and the whole graph would outlive the loss (it did:
        # the last CAP graph, GBs on CUDA, inflated every later model's "peak MiB").
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = row.method.loss(row.model, x, y, row_state(row, x, state))
    del loss
    return sum(storages.values())


def timed_step(row: Row, x: torch.Tensor, y: torch.Tensor, state: StepState,
               device: torch.device) -> None:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    stats = step(row, x, y, state)
    if cuda:
        torch.cuda.synchronize(device)
    row.times_s.append(time.perf_counter() - began)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        row.peak_bytes.append(peak)
        row.step_bytes.append(peak - before)
    row.stat_keys = sorted(stats)


def bench_model(model_name: str, args: argparse.Namespace, device: torch.device
                ) -> tuple[list[Row], dict[str, Any]]:
    info = dataset_info(DATASET)
    torch.manual_seed(args.seed)
    base = build_model(model_name, info)
    rows = make_rows(model_name, base, args.batch_size, device)
    if args.rows is not None:
        rows = [row for row in rows if row.label in args.rows]
    data_gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand((args.batch_size, *info.input_shape), generator=data_gen).to(device)
    y = torch.randint(0, info.num_classes, (args.batch_size,), generator=data_gen).to(device)
    state = StepState(T_FINAL, EPS, PerturbationSet("linf", EPS),
                      torch.Generator().manual_seed(args.seed))
    for _ in range(args.warmup):
        for row in rows:
            step(row, x, y, state)
    for _ in range(args.repeats):  # round-robin: one step of each method in turn
        for row in rows:
            timed_step(row, x, y, state, device)
    for row in rows:
        row.saved_bytes = saved_for_backward(row, x, y, state)
    pure = next(r for r in rows if r.label == "ibp pure")
    assert "fit_loss" not in pure.stat_keys, "ibp pure ran the nominal pass"
    if args.profile is not None and model_name == args.models[0]:
        profile(next(r for r in rows if r.label == args.profile), x, y, state, device)
    meta = {"model": model_name, "parameters": count_parameters(base),
            "input_shape": list(info.input_shape), "num_classes": info.num_classes}
    return rows, meta


def profile(row: Row, x: torch.Tensor, y: torch.Tensor, state: StepState,
            device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        for _ in range(5):
            step(row, x, y, state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of 5 steps of {row.label!r} ({key}):")
    print(prof.key_averages().table(sort_by=key, row_limit=25))


def summarize(rows: list[Row], meta: dict[str, Any]) -> list[dict[str, Any]]:
    nominal = statistics.median(rows[0].times_s)
    nominal_min = min(rows[0].times_s)
    out = []
    for row in rows:
        ms = [t * 1e3 for t in row.times_s]
        median = statistics.median(row.times_s)
        q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
        target = TARGETS.get(row.label)
        ratio = median / nominal
        out.append({
            "model": meta["model"], "row": row.label, "method": row.method_name,
            "method_options": row.options, "median_ms": median * 1e3, "min_ms": min(ms),
            "p25_ms": q[0], "p75_ms": q[2], "ratio": ratio,
            "ratio_of_min": min(row.times_s) / nominal_min, "target": target,
            "meets_target": None if target is None else ratio <= target,
            "peak_mib": max(row.peak_bytes) / 2**20 if row.peak_bytes else None,
            "step_mib": max(row.step_bytes) / 2**20 if row.step_bytes else None,
            "saved_mib": row.saved_bytes / 2**20 if row.saved_bytes is not None else None,
            "times_ms": ms,
        })
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    header = (f"{'model':<8} {'method':<10} {'ms/step':>9} {'p25-p75 ms':>15} {'ratio':>7} "
              f"{'target':>13} {'min-ratio':>9} {'peak MiB':>9} {'+MiB':>8} {'saved MiB':>9}")
    print(header)
    print("-" * len(header))
    last_model = None
    for r in results:
        if last_model is not None and r["model"] != last_model:
            print()
        last_model = r["model"]
        if r["target"] is None:
            target = ""
        else:
            target = f"<={r['target']:.1f}x " + ("ok" if r["meets_target"] else "OVER")
        mib = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        step_mib = "n/a" if r["step_mib"] is None else f"{r['step_mib']:.0f}"
        saved = "n/a" if r["saved_mib"] is None else f"{r['saved_mib']:.0f}"
        spread = f"{r['p25_ms']:.1f}-{r['p75_ms']:.1f}"
        print(f"{r['model']:<8} {r['row']:<10} {r['median_ms']:>9.1f} {spread:>15} "
              f"{r['ratio']:>6.2f}x {target:>13} {r['ratio_of_min']:>8.2f}x {mib:>9} "
              f"{step_mib:>8} {saved:>9}")


def print_lipschitz_table(results: list[dict[str, Any]]) -> None:
    """The Lipschitz rows over nominal and over pure IBP, with the issue's targets (BCP <= 1.5x
    IBP, Local-Lip <= 1.5x BCP)."""
    by = {(r["model"], r["row"]): r["median_ms"] for r in results}
    mine = [r for r in results if r["row"] in LIPSCHITZ_ROWS]
    if not mine:
        return
    print(f"\nLipschitz rows (l2, eps {L2_EPS:.4f}): {'model':<8} {'method':<12} {'ms/step':>9} "
          f"{'/nominal':>9} {'/ibp pure':>10}  target")
    for r in mine:
        model = r["model"]
        target = ""
        if r["row"] in LIPSCHITZ_TARGETS:
            ref, limit = LIPSCHITZ_TARGETS[r["row"]]
            ratio = r["median_ms"] / by[(model, ref)]
            target = f"{ratio:.2f}x {ref} (<= {limit}x: {'ok' if ratio <= limit else 'OVER'})"
        print(f"{'':<33}{model:<8} {r['row']:<12} {r['median_ms']:>9.1f} "
              f"{r['median_ms'] / by[(model, 'nominal')]:>8.2f}x "
              f"{r['median_ms'] / by[(model, 'ibp pure')]:>9.2f}x  {target}")


def main(argv: list[str] | None = None) -> int:
    began = time.perf_counter()
    args = parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    header = {
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "python": platform.python_version(), "batch_size": args.batch_size,
        "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads(),
        "dataset": DATASET, "eps": EPS, "t": T_FINAL,
    }
    print(f"device: {header['device_name']} [{device.type}]  torch {torch.__version__}  "
          f"python {header['python']}")
    print(f"batch size {args.batch_size}, {args.warmup} warm-up + {args.repeats} timed steps per "
          f"method (round-robin, median), eps {EPS:.5f}, CIFAR-10-shaped random input")
    results, metas = [], []
    for model_name in args.models:
        model_began = time.perf_counter()
        rows, meta = bench_model(model_name, args, device)
        print(f"  {model_name}: {len(rows)} methods x {args.warmup + args.repeats} steps in "
              f"{time.perf_counter() - model_began:.1f} s", flush=True)
        metas.append(meta)
        results += summarize(rows, meta)
        del rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print_table(results)
    print_lipschitz_table(results)
    print("\nratio = median ms/step / nominal's median on the same model (the figure to quote); "
          "min-ratio = fastest step / nominal's fastest (a cross-check on a busy machine); "
          "peak MiB = max_memory_allocated during the step, +MiB = that minus what was "
          "allocated before it (CUDA only); saved MiB = tensors autograd keeps for the backward "
          "pass of one loss (any device)")
    print("references: " + "; ".join(REFERENCES))
    total = time.perf_counter() - began
    print(f"total runtime {total:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(header | {"models": metas, "results": results, "total_s": total}, f,
                      indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

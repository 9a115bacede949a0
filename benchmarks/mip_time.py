"""Seconds per example of the complete (MIP) verifier on the IBP paper's MNIST `small` model.

Trains (or loads) an IBP `small` model on `mnist-idx` (the real MNIST images in IDX files; on
these machines ../shared/data/mnist holds the 10,000 test images, which the data set splits
8,000 / 2,000), then runs `mip_verify` on the first N held-out examples at eps = 0.1 with the
IBP paper's protocol (a time limit per example, the LP relaxation on timeout) once per choice of
big-M boxes: `ibp` (interval bounds) and `crown` (CROWN's intersected with IBP's, what the `mip`
certifier uses). Prints the median and 90th-percentile seconds per example and how many examples
were proved, refuted, or timed out; the same over the examples that needed the solver (not
decided by the bounds alone or by a misclassified clean point).

Usage (from the repository root):
    PYTHONPATH=. python benchmarks/mip_time.py --data-root ../shared/data/mnist \
        [--checkpoint small.pt] [--examples 30] [--time-limit 60] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch

from workers.core.bounds import PerturbationSet
from workers.core.config import RunConfig, resolve
from workers.core.data import load_split
from workers.core.mip import crown_ibp_intersection_bounds, ibp_preactivation_bounds, mip_verify
from workers.core.models import build
from workers.core.train import load_checkpoint, train

BOUNDS = {"ibp": ibp_preactivation_bounds, "crown": crown_ibp_intersection_bounds}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="folder with the MNIST IDX files")
    parser.add_argument("--checkpoint", default="mip_small.pt",
                        help="trained model: loaded if the file exists, else trained and saved")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--examples", type=int, default=30)
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per example")
    parser.add_argument("--workers", type=int, default=1, help="solver processes")
    parser.add_argument("--bounds", default="ibp,crown", help="comma-separated: ibp, crown")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.bounds = [b.strip() for b in args.bounds.split(",") if b.strip()]
    unknown = set(args.bounds) - set(BOUNDS)
    if unknown or not args.bounds:
        parser.error(f"--bounds: unknown {sorted(unknown)}; allowed: {', '.join(BOUNDS)}")
    if args.examples < 1 or args.time_limit <= 0:
        parser.error("--examples must be >= 1 and --time-limit > 0")
    return args


def trained_model(args: argparse.Namespace) -> torch.nn.Module:
    path = Path(args.checkpoint)
    if path.exists():
        state = load_checkpoint(path)
        model = build(state["config"])
        model.load_state_dict(state["model_state"])
        return model.eval()
    config = resolve(RunConfig(method="ibp", dataset="mnist-idx", model="small", eps=args.eps,
                               eps_train=2 * args.eps, epochs=args.epochs, batch_size=100,
                               data_root=args.data_root, certifiers=["ibp"]))
    x, y = load_split("mnist-idx", "train", args.data_root)
    began = time.perf_counter()
    result = train(config, x, y, checkpoint_path=path, resume=False, show_progress=True)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - began:.0f} s -> {path}")
    return result.model.eval()


def distribution(results: list[dict]) -> dict | None:
    """Median, 90th percentile and maximum seconds per example, and the verdicts."""
    if not results:
        return None
    seconds = sorted(r["seconds"] for r in results)
    p90 = statistics.quantiles(seconds, n=10, method="inclusive")[-1] if len(seconds) > 1 \
        else seconds[0]
    return {"median_s": statistics.median(seconds), "p90_s": p90, "max_s": seconds[-1],
            "statuses": dict(collections.Counter(r["status"] for r in results))}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    model = trained_model(args)
    x, y = load_split("mnist-idx", "test", args.data_root)
    x, y = x[:args.examples], y[:args.examples]
    perturbation = PerturbationSet("linf", args.eps)
    figures = {}
    for name in args.bounds:
        began = time.perf_counter()
        results = mip_verify(model, x, y, perturbation, time_limit=args.time_limit,
                             workers=args.workers, bounds_fn=BOUNDS[name])
        wall = time.perf_counter() - began
        solved = [r for r in results
                  if any(t["method"] in ("mip", "lp") for t in r["targets"].values())]
        figures[name] = {"all": distribution(results), "needed_solver": distribution(solved),
                         "wall_s": wall, "verified": sum(r["verified"] for r in results),
                         "per_example": [{"seconds": r["seconds"], "status": r["status"],
                                          "solver": r in solved} for r in results]}
        for subset, label in (("all", f"all {len(x)}"),
                              ("needed_solver", f"{len(solved)} that needed the solver")):
            d = figures[name][subset]
            if d:
                print(f"bounds {name:5s}, {label}: median {d['median_s']:.2f} s, p90 "
                      f"{d['p90_s']:.2f} s, max {d['max_s']:.2f} s per example; {d['statuses']}")
        print(f"bounds {name:5s}: {figures[name]['verified']}/{len(x)} verified; wall {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "eps": args.eps, "examples": args.examples, "time_limit_s": args.time_limit,
            "workers": args.workers, "bounds": figures}, indent=2))


if __name__ == "__main__":
    main()

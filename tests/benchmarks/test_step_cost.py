"""benchmarks/step_cost.py on the CPU: every row steps, its saved-for-backward bytes are counted,
and measuring them leaves no autograd graph behind (it once kept the last CAP graph alive, GBs on
CUDA, which inflated the next model's peak memory)."""
from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

import torch

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "step_cost.py"


def load_step_cost():
    spec = importlib.util.spec_from_file_location("step_cost", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_cost"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def live_tensor_bytes() -> int:
    gc.collect()
    return sum(o.untyped_storage().nbytes() for o in gc.get_objects()
               if isinstance(o, torch.Tensor) and o.device.type == "cpu")


def test_rows_step_and_leave_no_graph_behind():
    step_cost = load_step_cost()
    args = step_cost.parse_args(["--device", "cpu", "--batch-size", "4", "--repeats", "1",
                                 "--warmup", "0", "--rows", "cap k=50"])
    args.models = ["medium"]
    step_cost.bench_model("medium", args, torch.device("cpu"))  # first use fills caches
    before = live_tensor_bytes()
    rows, meta = step_cost.bench_model("medium", args, torch.device("cpu"))
    assert {row.label for row in rows} == {"nominal", "ibp pure", "cap k=50"}
    assert all(len(row.times_s) == 1 and row.saved_bytes > 0 for row in rows)
    cap = next(row for row in rows if row.label == "cap k=50")
    nominal = next(row for row in rows if row.label == "nominal")
    assert cap.saved_bytes > 10 * nominal.saved_bytes  # 50 projections per layer
    del rows, cap, nominal
    assert live_tensor_bytes() - before < 2 ** 20  # the models, optimizers and graphs are gone

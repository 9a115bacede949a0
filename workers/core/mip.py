"""A complete verifier: the mixed-integer program of Tjeng et al. per example, solved by HiGHS
(`scipy.optimize.milp`), with the IBP paper's protocol (Gowal et al., Section 4): a time limit per
example; on timeout the LP relaxation (binaries relaxed) decides the targets left; an example that
neither proves is not verified.

The network (an `nn.Sequential` of Normalize, Linear, Conv2d, Flatten, Identity and ReLU) is first
converted to affine maps with ReLUs between them: Normalize and Flatten fold into the next affine
map, a Conv2d becomes a sparse matrix on the flattened input of the shape it actually sees. Only
that numpy form goes to the solver processes.

For target class j != y the MIP minimizes the margin z_y - z_j over the input set, the last layer
elided into the objective. Pre-activation bounds [l, u] (IBP by default; any `bounds_fn` can
replace it, and the `mip` certifier uses CROWN's intersected with IBP's; optionally tightened by
per-neuron LPs) fix the stable ReLUs (u <= 0:
h = 0; l >= 0: h = pre) and give big-M constraints for the unstable ones, with a binary a:
h >= pre, h >= 0, h <= pre - l (1 - a), h <= u a.

Only l_inf sets are supported: the l_2 ball is a quadratic constraint, which a MILP cannot hold.

Verdicts per example (`status`):
- "proved": every target's minimum (the solver's dual bound) is > 0;
- "refuted": a point of the set that the torch model classifies as another class was found
  (the clean point itself, or the MIP's minimizer, re-run through the torch model);
- "timeout-lp-proved": the time limit hit, and every target left was proved by the LP relaxation
  (or the dual bound reached before the limit);
- "timeout-unknown": the time limit hit and the LP relaxation did not prove some target;
- "unknown": the solver finished (or failed) without proving a target, and its minimizer does not
  misclassify under torch (numerical disagreement at a margin of about 0). Not verified.
"""
from __future__ import annotations

import copy
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from .bounds.interval import interval_bounds, layers_of
from .bounds.perturbation import PerturbationSet
from .certify import CERTIFIERS
from .models import Normalize

BoundsFn = Callable[[nn.Module, torch.Tensor, PerturbationSet],
                    Sequence[tuple[torch.Tensor, torch.Tensor]]]

# A bound b from a bounds function is widened by _SLACK * (1 + |b|) before use, so rounding in
# whichever precision it was computed in cannot cut the true optimum off the MIP.
_SLACK = 1e-6
# A margin bound must exceed this to count as proved (solver tolerances are about 1e-7 to 1e-9).
PROVE_TOL = 1e-6


# ------------------------------------------------------------------------------------------------
# The network as affine maps and ReLUs


@dataclass
class AffineReLUNet:
    """z = W_L relu(... relu(W_0 x + b_0) ...) + b_L on the flattened input x (pixel scale).

    `weights[k]` are scipy CSR matrices (float64), `biases[k]` numpy vectors; a ReLU follows every
    map but the last."""
    input_shape: tuple[int, ...]
    weights: list[sp.csr_matrix]
    biases: list[np.ndarray]

    @property
    def hidden(self) -> int:
        return len(self.weights) - 1

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits for flattened inputs: x (n,) or (B, n)."""
        v = np.asarray(x, dtype=np.float64)
        single = v.ndim == 1
        v = v.reshape(1, -1) if single else v.reshape(v.shape[0], -1)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            v = (w @ v.T).T + b
            if k < self.hidden:
                v = np.maximum(v, 0.0)
        return v[0] if single else v

    def hidden_pre(self, x: np.ndarray) -> list[np.ndarray]:
        """The pre-activations of every hidden layer at one flattened input."""
        v, out = np.asarray(x, dtype=np.float64).ravel(), []
        for k in range(self.hidden):
            v = self.weights[k] @ v + self.biases[k]
            out.append(v)
            v = np.maximum(v, 0.0)
        return out


def _conv_matrix(layer: nn.Conv2d, shape: tuple[int, ...]) -> tuple[sp.csr_matrix, np.ndarray,
                                                                     tuple[int, ...]]:
    """The conv as a sparse matrix on the flattened input of `shape` (C, H, W)."""
    n = math.prod(shape)
    weight = layer.weight.detach().to("cpu", torch.float64)
    with torch.no_grad():
        # Column i is the conv of basis image i (the bias applies separately).
        columns = F.conv2d(torch.eye(n, dtype=torch.float64).reshape(n, *shape), weight, None,
                           layer.stride, layer.padding, layer.dilation, layer.groups)
    out_shape = tuple(columns.shape[1:])
    matrix = sp.csr_matrix(columns.reshape(n, -1).numpy().T)
    matrix.eliminate_zeros()
    spatial = out_shape[1] * out_shape[2]
    bias = (layer.bias.detach().to("cpu", torch.float64).repeat_interleave(spatial).numpy()
            if layer.bias is not None else np.zeros(matrix.shape[0]))
    return matrix, bias, out_shape


def convert(model: nn.Module, input_shape: Sequence[int]) -> AffineReLUNet:
    """The model (on inputs of `input_shape`, without the batch) as affine maps and ReLUs."""
    shape = tuple(int(s) for s in input_shape)
    size = math.prod(shape)
    pending_m: sp.csr_matrix | None = None  # None: identity
    pending_c = np.zeros(size)
    weights, biases = [], []

    def compose(matrix, bias):
        nonlocal pending_m, pending_c
        pending_m = matrix if pending_m is None else sp.csr_matrix(matrix @ pending_m)
        pending_c = matrix @ pending_c + bias

    for layer in layers_of(model):
        if isinstance(layer, Normalize):
            mean = layer.mean.detach().to("cpu", torch.float64)
            std = layer.std.detach().to("cpu", torch.float64)
            scale = torch.broadcast_to(1.0 / std, shape).reshape(-1).numpy()
            shift = torch.broadcast_to(-mean / std, shape).reshape(-1).numpy()
            compose(sp.diags(scale, format="csr"), shift)
        elif isinstance(layer, (nn.Flatten, nn.Identity)):
            if isinstance(layer, nn.Flatten) and layer.start_dim not in (1, -len(shape) - 1):
                raise TypeError("only Flatten(start_dim=1) is supported")
            shape = (math.prod(shape),) if isinstance(layer, nn.Flatten) else shape
        elif isinstance(layer, nn.Linear):
            if len(shape) != 1:
                raise TypeError(f"a Linear layer on input of shape {shape}: Flatten first")
            weight = sp.csr_matrix(layer.weight.detach().to("cpu", torch.float64).numpy())
            bias = (layer.bias.detach().to("cpu", torch.float64).numpy()
                    if layer.bias is not None else np.zeros(weight.shape[0]))
            compose(weight, bias)
            shape = (weight.shape[0],)
        elif isinstance(layer, nn.Conv2d):
            if len(shape) != 3 or layer.padding_mode != "zeros":
                raise TypeError(f"Conv2d needs (C, H, W) input and zero padding, got {shape}")
            matrix, bias, shape = _conv_matrix(layer, shape)
            compose(matrix, bias)
        elif isinstance(layer, nn.ReLU):
            n = math.prod(shape)
            weights.append(pending_m if pending_m is not None else sp.identity(n, format="csr"))
            biases.append(pending_c)
            pending_m, pending_c = None, np.zeros(n)
        else:
            raise TypeError(f"the MIP verifier cannot encode layer {type(layer).__name__}; "
                            "supported: Normalize, Linear, Conv2d, Flatten, Identity, ReLU")
    n = math.prod(shape)
    weights.append(pending_m if pending_m is not None else sp.identity(n, format="csr"))
    biases.append(pending_c)
    return AffineReLUNet(tuple(int(s) for s in input_shape), weights, biases)


# ------------------------------------------------------------------------------------------------
# Pre-activation bounds


def _float64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to("cpu", torch.float64).eval()


def ibp_preactivation_bounds(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet
                             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """IBP boxes (B, ...) of the input of every ReLU, from `interval_bounds` of each prefix."""
    layers = layers_of(model)
    return [interval_bounds(layers[:i], x, perturbation)
            for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU)]


def crown_ibp_intersection_bounds(model: nn.Module, x: torch.Tensor,
                                  perturbation: PerturbationSet, chunk: int = 4
                                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The tightest cheap boxes: CROWN's (intermediate bounds by CROWN itself) intersected with
    IBP's, both sound. CROWN's identity specification costs memory in the number of neurons, so
    examples go `chunk` at a time. Fewer unstable ReLUs mean fewer binaries in the MIP."""
    from .bounds.linear import preactivation_bounds as linear_preactivation_bounds

    ibp = ibp_preactivation_bounds(model, x, perturbation)
    parts = [linear_preactivation_bounds(model, x[i:i + chunk], perturbation, method="crown")
             for i in range(0, len(x), chunk)]
    boxes = []
    for k, (lower, upper) in enumerate(ibp):
        crown_lower = torch.cat([part[k][0] for part in parts])
        crown_upper = torch.cat([part[k][1] for part in parts])
        boxes.append((torch.maximum(lower, crown_lower), torch.minimum(upper, crown_upper)))
    return boxes


def _widen(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return lower - _SLACK * (1 + np.abs(lower)), upper + _SLACK * (1 + np.abs(upper))


def preactivation_bounds(model: nn.Module, net: AffineReLUNet, x: torch.Tensor,
                         perturbation: PerturbationSet, bounds_fn: BoundsFn | None = None
                         ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per example, per hidden layer: (l, u) flattened, float64, widened by the slack. Computed
    on a float64 copy of the model; also intersected with the interval bounds of the converted
    net (the same IBP, a check that both forms agree in size)."""
    model64, x64 = _float64(model), x.detach().to("cpu", torch.float64)
    with torch.no_grad():
        boxes = (bounds_fn or ibp_preactivation_bounds)(model64, x64, perturbation)
    boxes = list(boxes)
    if len(boxes) != net.hidden:
        raise ValueError(f"bounds_fn gave {len(boxes)} layers of bounds; the net has "
                         f"{net.hidden} ReLU layers")
    lo, hi = (t.flatten(1).numpy() for t in perturbation.box(x64))
    result = []
    for b in range(len(x)):
        layers, l_prev, u_prev = [], lo[b], hi[b]
        for k, (lower, upper) in enumerate(boxes):
            lower = lower[b].detach().to("cpu", torch.float64).reshape(-1).numpy()
            upper = upper[b].detach().to("cpu", torch.float64).reshape(-1).numpy()
            if lower.shape[0] != net.weights[k].shape[0]:
                raise ValueError(f"bounds for ReLU layer {k} have {lower.shape[0]} units; the "
                                 f"net has {net.weights[k].shape[0]}")
            # Interval bounds of the converted net from the previous (widened) bounds: sound.
            mu, r = (u_prev + l_prev) / 2, (u_prev - l_prev) / 2
            w = net.weights[k]
            centre, radius = w @ mu + net.biases[k], abs(w) @ r
            lower, upper = _widen(np.maximum(lower, centre - radius),
                                  np.minimum(upper, centre + radius))
            layers.append((lower, upper))
            l_prev, u_prev = np.maximum(lower, 0), np.maximum(upper, 0)
        result.append(layers)
    return result


# ------------------------------------------------------------------------------------------------
# The MIP of one example


class _Program:
    """Variables [x | h_1 | ... | h_d | binaries] and Tjeng et al.'s constraints for the first
    `depth` hidden layers."""

    def __init__(self, net: AffineReLUNet, bounds: list[tuple[np.ndarray, np.ndarray]],
                 lo: np.ndarray, hi: np.ndarray, depth: int):
        sizes = [lo.shape[0]] + [net.weights[k].shape[0] for k in range(depth)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        unstable = [np.flatnonzero((bounds[k][0] < 0) & (bounds[k][1] > 0)) for k in range(depth)]
        self.binary_offsets = self.offsets[-1] + np.concatenate(
            [[0], np.cumsum([len(u) for u in unstable])]).astype(int)
        self.n = int(self.binary_offsets[-1])
        var_lo, var_hi = np.zeros(self.n), np.ones(self.n)
        var_lo[: sizes[0]], var_hi[: sizes[0]] = lo, hi
        rows, cols, vals, row_lo, row_hi = [], [], [], [], []
        count = 0

        def add(matrix: sp.coo_matrix, col_offset: int, row_offset: int):
            rows.append(matrix.row + row_offset)
            cols.append(matrix.col + col_offset)
            vals.append(matrix.data)

        def add_diag(row_ids, col_ids, values):
            rows.append(np.asarray(row_ids))
            cols.append(np.asarray(col_ids))
            vals.append(np.broadcast_to(np.asarray(values, dtype=np.float64), len(row_ids)))

        for k in range(depth):
            lower, upper = bounds[k]
            w, b = net.weights[k], net.biases[k]
            prev, here = self.offsets[k], self.offsets[k + 1]
            var_lo[here: here + sizes[k + 1]] = np.maximum(lower, 0)
            var_hi[here: here + sizes[k + 1]] = np.maximum(upper, 0)
            active = np.flatnonzero(lower >= 0)
            if len(active):  # h = W h_prev + b
                add(w[active].tocoo(), prev, count)
                add_diag(count + np.arange(len(active)), here + active, -1.0)
                row_lo.append(-b[active]); row_hi.append(-b[active])
                count += len(active)
            idx = unstable[k]
            if not len(idx):
                continue
            m, lu, uu, bu = len(idx), lower[idx], upper[idx], b[idx]
            binaries = self.binary_offsets[k] + np.arange(m)
            sub = w[idx].tocoo()
            # h >= W h_prev + b:  W h_prev - h <= -b
            add(sub, prev, count)
            add_diag(count + np.arange(m), here + idx, -1.0)
            row_lo.append(np.full(m, -np.inf)); row_hi.append(-bu)
            count += m
            # h <= W h_prev + b - l (1 - a):  -W h_prev + h - l a <= b - l
            add(sp.coo_matrix((-sub.data, (sub.row, sub.col)), shape=sub.shape), prev, count)
            add_diag(count + np.arange(m), here + idx, 1.0)
            add_diag(count + np.arange(m), binaries, -lu)
            row_lo.append(np.full(m, -np.inf)); row_hi.append(bu - lu)
            count += m
            # h <= u a
            add_diag(count + np.arange(m), here + idx, 1.0)
            add_diag(count + np.arange(m), binaries, -uu)
            row_lo.append(np.full(m, -np.inf)); row_hi.append(np.zeros(m))
            count += m
        self.bounds = Bounds(var_lo, var_hi)
        self.integrality = np.zeros(self.n)
        self.integrality[self.offsets[-1]:] = 1
        if count:
            matrix = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                           np.concatenate(cols))),
                                   shape=(count, self.n))
            self.constraints = [LinearConstraint(matrix, np.concatenate(row_lo),
                                                 np.concatenate(row_hi))]
        else:
            self.constraints = []
        self.input_size = sizes[0]

    def solve(self, objective_last: np.ndarray, *, integral: bool, time_limit: float | None,
              mip_rel_gap: float | None = None) -> dict:
        """Minimize objective_last . h_depth (x when depth is 0). Returns status ("optimal",
        "timeout", "error"), lower (a proven lower bound or -inf), upper (the objective at the
        solver's point or None), x (the input part of that point or None), message."""
        c = np.zeros(self.n)
        c[self.offsets[-2]: self.offsets[-1]] = objective_last
        options: dict = {"disp": False}
        if time_limit is not None:
            options["time_limit"] = max(float(time_limit), 1e-6)
        if mip_rel_gap is not None and integral:
            options["mip_rel_gap"] = mip_rel_gap
        res = milp(c, integrality=self.integrality if integral else None, bounds=self.bounds,
                   constraints=self.constraints, options=options)
        lower = -np.inf
        if res.status == 0:
            dual = getattr(res, "mip_dual_bound", None) if integral else None
            lower = float(dual) if dual is not None and np.isfinite(dual) else float(res.fun)
            if res.fun is not None:
                lower = min(lower, float(res.fun))
        elif res.status == 1 and integral:
            dual = getattr(res, "mip_dual_bound", None)
            lower = float(dual) if dual is not None and np.isfinite(dual) else -np.inf
        status = {0: "optimal", 1: "timeout"}.get(res.status, "error")
        x = None if res.x is None else np.asarray(res.x[: self.input_size])
        upper = None if res.fun is None or res.x is None else float(res.fun)
        return {"status": status, "lower": lower, "upper": upper, "x": x,
                "message": str(res.message)}


def tighten_bounds(net: AffineReLUNet, bounds: list[tuple[np.ndarray, np.ndarray]],
                   lo: np.ndarray, hi: np.ndarray, time_limit: float | None = None
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-neuron LP bounds, layer by layer (Tjeng et al.'s progressive tightening with the LP
    relaxation): for every unstable neuron of hidden layer k >= 1, min and max of its
    pre-activation over the LP relaxation of layers < k. Two LPs per unstable neuron: cheap only
    for small nets."""
    bounds = [(l.copy(), u.copy()) for l, u in bounds]
    for k in range(1, net.hidden):
        program = _Program(net, bounds, lo, hi, depth=k)
        lower, upper = bounds[k]
        w, b = net.weights[k], net.biases[k]
        for i in np.flatnonzero((lower < 0) & (upper > 0)):
            row = w[i].toarray().ravel()
            low = program.solve(row, integral=False, time_limit=time_limit)
            if low["status"] == "optimal":
                lower[i] = max(lower[i], low["lower"] + b[i])
            high = program.solve(-row, integral=False, time_limit=time_limit)
            if high["status"] == "optimal":
                upper[i] = min(upper[i], -high["lower"] + b[i])
        bounds[k] = _widen(lower, upper)
    return bounds


# ------------------------------------------------------------------------------------------------
# One example, in whichever process


@dataclass
class _Task:
    index: int
    lo: np.ndarray
    hi: np.ndarray
    label: int
    targets: list[int]  # in the order to try them
    bounds: list[tuple[np.ndarray, np.ndarray]]
    time_limit: float
    lp_time_limit: float | None
    tighten: bool
    exact: bool  # solve every target to optimality, no early stop (for exact minima)
    mip_rel_gap: float | None


_NET: AffineReLUNet | None = None


def _init_worker(net: AffineReLUNet) -> None:
    global _NET
    _NET = net
    torch.set_num_threads(1)


def _objective(net: AffineReLUNet, label: int, target: int) -> tuple[np.ndarray, float]:
    last_w, last_b = net.weights[-1], net.biases[-1]
    row = (last_w[label] - last_w[target]).toarray().ravel()
    return row, float(last_b[label] - last_b[target])


def _margins(net: AffineReLUNet, x: np.ndarray, label: int) -> np.ndarray:
    z = net.forward(x)
    return z[label] - z


def _solve_task(task: _Task, net: AffineReLUNet | None = None) -> dict:
    net = net if net is not None else _NET
    began = time.perf_counter()
    deadline = began + task.time_limit
    bounds = task.bounds
    if task.tighten:
        bounds = tighten_bounds(net, bounds, task.lo, task.hi)
    program = _Program(net, bounds, task.lo, task.hi, depth=net.hidden)
    targets: dict[int, dict] = {}

    def done(status: str, candidate: int | None = None) -> dict:
        return {"index": task.index, "status": status, "candidate": candidate,
                "targets": targets, "seconds": time.perf_counter() - began}

    refuted, unknown, timed_out = None, False, False
    for j in task.targets:
        left = deadline - time.perf_counter()
        if left <= 0:
            timed_out = True
            break
        weight, offset = _objective(net, task.label, j)
        out = program.solve(weight, integral=True, time_limit=left, mip_rel_gap=task.mip_rel_gap)
        record = {"method": "mip", "solver": out["status"], "lower": out["lower"] + offset,
                  "upper": None}
        if out["x"] is not None:
            point = np.clip(out["x"], task.lo, task.hi)
            record["upper"] = float(_margins(net, point, task.label)[j])
            record["point"] = point
        targets[j] = record
        if record["lower"] > PROVE_TOL:
            continue
        if record["upper"] is not None and record["upper"] < 0:
            # A candidate counterexample (numpy forward); the caller confirms it under torch.
            refuted = j if refuted is None else refuted
        elif out["status"] == "timeout":
            timed_out = True
        else:
            unknown = True  # finished (or failed) without a proof or a counterexample
        if not task.exact:
            break
    if task.exact or refuted is not None:
        return done("refuted" if refuted is not None else
                    "unknown" if unknown or timed_out else "proved", refuted)
    if unknown:
        return done("unknown")
    if not timed_out:
        return done("proved")
    # The time limit hit: the LP relaxation decides every target the MIP has not proved.
    for j in task.targets:
        previous = targets.get(j)
        if previous is not None and previous["lower"] > PROVE_TOL:
            continue
        weight, offset = _objective(net, task.label, j)
        out = program.solve(weight, integral=False, time_limit=task.lp_time_limit)
        lower = out["lower"] + offset
        record = {"method": "lp", "solver": out["status"], "lower": lower, "upper": None}
        if previous is not None:  # the MIP's dual bound at the time limit is also a bound
            record.update(lower=max(lower, previous["lower"]), upper=previous["upper"])
        targets[j] = record
        if record["lower"] <= PROVE_TOL:
            return done("timeout-unknown")
    return done("timeout-lp-proved")


# ------------------------------------------------------------------------------------------------
# The batch API


def _check_perturbation(perturbation: PerturbationSet) -> None:
    if perturbation.norm != "linf":
        raise ValueError(f"the MIP verifier supports only linf sets (got {perturbation.norm!r}): "
                         "an l2 ball is a quadratic constraint, which a MILP cannot express")


def _prepare(model, x, y, perturbation, bounds_fn, order_targets: bool):
    _check_perturbation(perturbation)
    net = convert(model, x.shape[1:])
    bounds = preactivation_bounds(model, net, x, perturbation, bounds_fn)
    lo, hi = (t.detach().to("cpu", torch.float64).flatten(1).numpy()
              for t in perturbation.box(x))
    labels = [int(v) for v in y.tolist()]
    num_classes = net.weights[-1].shape[0]
    orders, margin_bounds = [], []
    for b, label in enumerate(labels):
        # Interval bound of every margin from the last hidden layer's bounds: to skip the targets
        # it proves and to try the most suspicious targets first.
        if net.hidden:
            l_last, u_last = (np.maximum(v, 0) for v in bounds[b][-1])
        else:
            l_last, u_last = lo[b], hi[b]
        mu, r = (u_last + l_last) / 2, (u_last - l_last) / 2
        bound = {}
        for j in range(num_classes):
            if j != label:
                weight, offset = _objective(net, label, j)
                bound[j] = float(weight @ mu - np.abs(weight) @ r + offset)
        margin_bounds.append(bound)
        orders.append(sorted(bound, key=bound.get) if order_targets else sorted(bound))
    return net, bounds, lo, hi, labels, orders, margin_bounds


def _run(net, tasks: list[_Task], workers: int) -> list[dict]:
    if workers <= 1 or len(tasks) <= 1:
        return [_solve_task(task, net) for task in tasks]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context,
                             initializer=_init_worker, initargs=(net,)) as pool:
        return list(pool.map(_solve_task, tasks))


def _torch_margins(model: nn.Module, point: np.ndarray, shape, label: int) -> np.ndarray:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    with torch.no_grad():
        z = model(torch.as_tensor(point, dtype=dtype, device=device).reshape(1, *shape))[0]
    return (z[label] - z).double().cpu().numpy()


def mip_verify(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               perturbation: PerturbationSet, *, time_limit: float = 600.0, workers: int = 1,
               bounds_fn: BoundsFn | None = None, tighten: bool = False,
               lp_time_limit: float | None = None) -> list[dict]:
    """The IBP paper's MIP protocol per example of the batch. Returns one dict per example:
    `verified` (bool), `status` (see the module docstring), `seconds`, `margin` (refuted: the
    torch margin z_y - max_{j != y} z_j at the counterexample, < 0), `counterexample` (refuted:
    the input, numpy, in x's shape), `target` (refuted: the class it reaches), `targets` (per
    target class: how it was decided, "bounds", "mip" or "lp", with its lower bound).

    `time_limit` is per example (all its targets together); `lp_time_limit` bounds each fallback
    LP (None: none). `bounds_fn(model, x, perturbation)` gives the (l, u) boxes of every ReLU's
    input (default IBP); `tighten` improves them with per-neuron LPs (small nets only)."""
    model_was_training = model.training
    model.eval()
    try:
        net, bounds, lo, hi, labels, orders, margin_bounds = _prepare(
            model, x, y, perturbation, bounds_fn, order_targets=True)
        shape = tuple(x.shape[1:])
        results: list[dict | None] = [None] * len(labels)
        tasks = []
        for b, label in enumerate(labels):
            margins = _torch_margins(model, x[b].detach().cpu().numpy(), shape, label)
            margins[label] = np.inf
            if margins.min() < 0:  # the clean point is already a counterexample
                results[b] = {"verified": False, "status": "refuted", "seconds": 0.0,
                              "margin": float(margins.min()), "target": int(margins.argmin()),
                              "counterexample": x[b].detach().cpu().numpy().copy(),
                              "targets": {}}
                continue
            todo = [j for j in orders[b] if margin_bounds[b][j] <= PROVE_TOL]
            if not todo:
                results[b] = {"verified": True, "status": "proved", "seconds": 0.0,
                              "margin": None, "targets": {j: {"method": "bounds", "lower": v}
                                                          for j, v in margin_bounds[b].items()}}
                continue
            tasks.append(_Task(b, lo[b], hi[b], label, todo, bounds[b], time_limit,
                               lp_time_limit, tighten, exact=False, mip_rel_gap=None))
        for out in _run(net, tasks, workers):
            b, label = out["index"], labels[out["index"]]
            targets = {j: {"method": "bounds", "lower": v} for j, v in margin_bounds[b].items()}
            for j, record in out["targets"].items():
                if record is not None:
                    targets[j] = {k: v for k, v in record.items() if k != "point"}
            result = {"verified": out["status"] in ("proved", "timeout-lp-proved"),
                      "status": out["status"], "seconds": out["seconds"], "margin": None,
                      "targets": targets}
            if out["status"] == "refuted":
                point = out["targets"][out["candidate"]]["point"]
                margins = _torch_margins(model, point, shape, label)
                margins[label] = np.inf
                if margins.min() < 0:
                    result.update(margin=float(margins.min()), target=int(margins.argmin()),
                                  counterexample=point.reshape(shape))
                else:  # the solver's point does not misclassify under torch: no claim
                    result["status"] = "unknown"
            results[b] = result
        return results
    finally:
        model.train(model_was_training)


def mip_min_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    perturbation: PerturbationSet, *, time_limit: float | None = None,
                    bounds_fn: BoundsFn | None = None, tighten: bool = False,
                    workers: int = 1, mip_rel_gap: float = 1e-9
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Exact minima of every margin z_y - z_j over the set, for tests of other bounds.

    Returns (lower, upper), each (B, K) with NaN at j = y: `lower` is the solver's proven bound,
    `upper` the margin (numpy forward, float64) at the solver's minimizer, a point of the set.
    Both equal the minimum up to the solver's tolerances when it finishes; on a time limit the
    gap stays open (upper NaN when no point was found)."""
    net, bounds, lo, hi, labels, orders, _ = _prepare(model, x, y, perturbation, bounds_fn,
                                                      order_targets=False)
    tasks = [_Task(b, lo[b], hi[b], label, orders[b], bounds[b],
                   math.inf if time_limit is None else time_limit, None, tighten, exact=True,
                   mip_rel_gap=mip_rel_gap) for b, label in enumerate(labels)]
    num_classes = net.weights[-1].shape[0]
    lower = np.full((len(labels), num_classes), np.nan)
    upper = np.full((len(labels), num_classes), np.nan)
    for out in _run(net, tasks, workers):
        for j, record in out["targets"].items():
            if record is not None:
                lower[out["index"], j] = record["lower"]
                if record.get("upper") is not None:
                    upper[out["index"], j] = record["upper"]
    return lower, upper


@CERTIFIERS.register("mip")
def certify_mip(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                perturbation: PerturbationSet) -> torch.Tensor:
    """The complete verifier under the IBP paper's protocol, big-M from CROWN boxes intersected
    with IBP's. Environment: CERTREPRO_MIP_WORKERS (processes, default 1),
    CERTREPRO_MIP_TIME_LIMIT (seconds per example, default 600)."""
    workers = int(os.environ.get("CERTREPRO_MIP_WORKERS", "1"))
    time_limit = float(os.environ.get("CERTREPRO_MIP_TIME_LIMIT", "600"))
    results = mip_verify(model, x, y, perturbation, time_limit=time_limit, workers=workers,
                         bounds_fn=crown_ibp_intersection_bounds)
    return torch.tensor([r["verified"] for r in results], dtype=torch.bool, device=x.device)

"""IBP Figure 4 (polytope_and_box) and BCP Figure 3 (tightness_violin) drawn from the
figure_data rows carry: PNGs with the parts the papers show, None without the data."""
from types import SimpleNamespace

import matplotlib.colors as mcolors
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.patches import Polygon, Rectangle

from experiments import load_spec, row_configs
from orchestrator import figures
from orchestrator.tables import RowOutcome, assemble
from workers.runner import run_row

PNG = b"\x89PNG\r\n\x1a\n"


def row(name, result, seed=0):
    return SimpleNamespace(name=name, seed=seed, result=result, config={})


def job(*rows):
    return SimpleNamespace(rows=list(rows))


def table(*labels):
    return {"rows": [{"id": row_id, "label": label} for row_id, label in labels], "columns": []}


def polytope_result(shift=0.0):
    hull = [[0.1 + shift, 0.0], [0.3 + shift, 0.1], [0.2 + shift, 0.25], [0.05 + shift, 0.15]]
    return {"metrics": {"bound_area": {"polytope": 0.03, "ibp": 0.1, "fill": 0.3}},
            "figure_data": {"bound_area": {
                "example": 0, "label": 1, "point": [0.18 + shift, 0.12], "hull": hull,
                "outline": hull + hull[:1], "box": [[0.0 + shift, 0.4 + shift], [-0.05, 0.3]]}}}


def tightness_result(taus, global_tau):
    mean = sum(taus) / len(taus)
    return {"metrics": {"tightness": {"bcp_mean": mean, "global": global_tau,
                                      "reduction": 1 - mean / global_tau}},
            "figure_data": {"tightness": {"bcp": taus}}}


def test_polytope_and_box_has_a_panel_per_row_with_hull_box_and_point():
    rows = [row("step200", polytope_result()), row("step800", polytope_result(0.5)),
            row("nominal", {"metrics": {}})]  # a row without the data is left out
    spec_table = table(("step200", "(b) Training step 200"), ("step800", "(c) Training step 800"))
    figure = figures.FIGURES.get("polytope_and_box")(job(*rows), spec_table)
    assert len(figure.axes) == 2
    assert figure.axes[0].get_title() == "(b) Training step 200 (seed 0)"
    for axis, shift in zip(figure.axes, (0.0, 0.5)):
        polygons = [p for p in axis.patches if isinstance(p, Polygon)]
        boxes = [p for p in axis.patches if isinstance(p, Rectangle)]
        assert len(polygons) == 1 and len(boxes) == 1
        assert mcolors.to_hex(polygons[0].get_facecolor()) == "#9a9a9a"  # gray polytope
        assert mcolors.to_hex(boxes[0].get_edgecolor()) == "#2ca02c"  # green IBP box
        assert boxes[0].get_x() == shift and boxes[0].get_width() == 0.4
        assert polygons[0].get_xy()[0].tolist() == [0.1 + shift, 0.0]
    png = figures.render_png("polytope_and_box", job(*rows), spec_table)
    assert png[:8] == PNG


def test_tightness_violin_has_a_violin_and_a_dotted_global_line_per_row():
    rows = [row("mnist", tightness_result([0.2, 0.25, 0.3, 0.22, 0.4], 0.8)),
            row("cifar10", tightness_result([1.0, 1.5, 1.1], 2.0), seed=1),
            row("unused", None)]
    spec_table = table(("mnist", "MNIST"), ("cifar10", "CIFAR-10"))
    figure = figures.FIGURES.get("tightness_violin")(job(*rows), spec_table)
    assert [axis.get_title() for axis in figure.axes] == ["MNIST (seed 0)", "CIFAR-10 (seed 1)"]
    for axis, global_tau, reduction in zip(figure.axes, (0.8, 2.0), ("65.8%", "40.0%")):
        assert any(isinstance(c, PolyCollection) for c in axis.collections)  # the violin
        dotted = [c for c in axis.collections if isinstance(c, LineCollection)
                  and c.get_linestyle()[0][1] is not None
                  and c.get_segments()[0][0][1] == global_tau]
        assert dotted, "the global bound's tau is missing"
        assert any(reduction in text.get_text() for text in axis.texts)
    assert figures.render_png("tightness_violin", job(*rows), spec_table)[:8] == PNG


def test_one_value_still_draws_and_a_global_line_above_it():
    figure = figures.FIGURES.get("tightness_violin")(
        job(row("one", tightness_result([0.5], 1.0))), table())
    assert figure.axes[0].get_title() == "one (seed 0)"
    assert figure.axes[0].get_ylim()[1] > 1.0


def test_both_figures_are_none_without_data():
    empty = job(row("a", None), row("b", {"metrics": {"clean_acc": 1.0}}),
                row("c", {"figure_data": {}}))
    for name in ("polytope_and_box", "tightness_violin"):
        assert figures.FIGURES.get(name)(empty, table()) is None
        assert figures.render_png(name, empty, table()) is None
        assert name not in figures.available(empty, table())
    both = job(row("toy", polytope_result()), row("bcp", tightness_result([0.1, 0.2], 0.5)))
    assert {"polytope_and_box", "tightness_violin"} <= set(figures.available(both, table()))


def test_a_real_ibp_figure4_row_fills_its_columns_and_draws(tmp_path):
    """The spec's step200 row cut to 5 steps: run, assembled into the table, drawn."""
    spec = load_spec("ibp/figure4")
    ((row_id, seed, config),) = row_configs(spec, "paper", rows=["step200"])
    result = run_row(dict(config, epochs=5, attack={"steps": 3, "restarts": 1}), tmp_path)
    table = assemble(spec, [RowOutcome(row_id, seed, "succeeded", result["metrics"],
                                       result=result)], "paper")
    cells = table["rows"][0]["cells"]
    for key in ("polytope_area", "ibp_area", "fill", "verified_ibp"):
        assert cells[key]["reproduced"] is not None, key
    assert cells["polytope_area"]["reproduced"] <= cells["ibp_area"]["reproduced"]
    figure = figures.FIGURES.get("polytope_and_box")(job(row(row_id, result, seed)), table)
    assert figure.axes[0].get_title() == "(b) Training step 200 (seed 0)"
    assert figures.render_png("polytope_and_box", job(row(row_id, result, seed)), table)[:8] == PNG

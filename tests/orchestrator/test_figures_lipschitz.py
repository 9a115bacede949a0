"""Local-Lip Figure 2 (lipschitz_during_training) and Figure 3 / 6 (varying_relu_share) drawn
from rows' history and metrics: PNGs with the curves and bars the paper shows, None without data."""
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
from matplotlib.patches import Rectangle

from experiments import load_spec, row_configs
from orchestrator import figures
from orchestrator.tables import RowOutcome, assemble
from workers.runner import run_row

PNG = b"\x89PNG\r\n\x1a\n"


def row(name, result, seed=0):
    return SimpleNamespace(name=name, seed=seed, result=result, config={})


def job(*rows):
    return SimpleNamespace(rows=list(rows))


TABLE = {"rows": [{"id": "ours", "label": "Ours (Local-Lip-B)"}, {"id": "bcp", "label": "BCP"},
                  {"id": "standard", "label": "Standard"}], "columns": []}


def history(epochs, global_start, local_start, layers=2, warmup=1):
    """Per-epoch means as the trainer writes them; the robust loss starts after the warm-up."""
    out = []
    for epoch in range(epochs):
        h = {"lipschitz": global_start * 1.1 ** epoch, "local_lipschitz": local_start / (1 + epoch),
             "fit_loss": 2.0 - 0.1 * epoch, "loss": 2.0,
             "varying_fraction": 0.5}
        h |= {f"varying_fraction.layer{i}": 0.6 - 0.05 * i - 0.02 * epoch
              for i in range(1, layers + 1)}
        if epoch >= warmup:
            h["robust_loss"] = 2.5 - 0.1 * epoch
        out.append(h)
    return out


def test_lipschitz_during_training_has_figure_2s_three_panels():
    rows = [row("ours", {"history": history(4, 10.0, 3.0)}),
            row("bcp", {"history": history(4, 5.0, 4.0)}),
            row("standard", {"history": [{"loss": 1.0, "fit_loss": 1.0}]})]  # no bounds: left out
    figure = figures.FIGURES.get("lipschitz_during_training")(job(*rows), TABLE)
    bounds, natural, robust = figure.axes
    assert bounds.get_yscale() == "log"
    labels = [line.get_label() for line in bounds.lines]
    assert labels == ["Ours (Local-Lip-B) (seed 0), global", "Ours (Local-Lip-B) (seed 0), local",
                      "BCP (seed 0), global", "BCP (seed 0), local"]
    assert [line.get_linestyle() for line in bounds.lines] == ["-", "--", "-", "--"]
    assert list(bounds.lines[1].get_ydata()) == pytest.approx([3.0, 1.5, 1.0, 0.75])
    assert len(natural.lines) == 2 and list(natural.lines[0].get_ydata()) == \
        pytest.approx([2.0, 1.9, 1.8, 1.7])
    # the warm-up epoch has no robust loss: a gap (NaN), not a zero
    robust_values = list(robust.lines[0].get_ydata())
    assert robust_values[0] != robust_values[0] and robust_values[1:] == pytest.approx(
        [2.4, 2.3, 2.2])
    plt.close(figure)
    assert figures.render_png("lipschitz_during_training", job(*rows), TABLE)[:8] == PNG


def test_varying_relu_share_bars_per_layer_and_curves_per_row():
    measured = {"ours": [0.4, 0.3, 0.2], "bcp": [0.2, 0.1, 0.1], "standard": [0.7, 0.6, 0.5]}
    rows = [row(name, {"metrics": {"varying_relu": {
        **{f"layer{i}": s for i, s in enumerate(shares, start=1)},
        "mean": sum(shares) / 3}}, "history": history(3, 1.0, 1.0, layers=3)
        if name != "standard" else [{"loss": 1.0}]}) for name, shares in measured.items()]
    figure = figures.FIGURES.get("varying_relu_share")(job(*rows), TABLE)
    bars_axis, *history_axes = figure.axes
    bars = [p for p in bars_axis.patches if isinstance(p, Rectangle)]
    assert len(bars) == 9  # 3 rows x 3 layers
    assert sorted(round(b.get_height(), 6) for b in bars) == sorted(
        s for shares in measured.values() for s in shares)
    assert [t.get_text() for t in bars_axis.get_xticklabels()] == ["layer 1", "layer 2", "layer 3"]
    # the history panels (Figure 6): one per row that recorded the per-layer shares
    assert [a.get_title() for a in history_axes] == [
        "during training: Ours (Local-Lip-B) (seed 0)", "during training: BCP (seed 0)"]
    assert [line.get_label() for line in history_axes[0].lines] == ["layer 1", "layer 2",
                                                                    "layer 3"]
    assert list(history_axes[0].lines[0].get_ydata()) == pytest.approx([0.55, 0.53, 0.51])
    plt.close(figure)
    assert figures.render_png("varying_relu_share", job(*rows), TABLE)[:8] == PNG


def test_varying_relu_share_from_history_alone_or_metrics_alone():
    only_history = job(row("ours", {"history": history(2, 1.0, 1.0)}))
    figure = figures.FIGURES.get("varying_relu_share")(only_history, TABLE)
    assert len(figure.axes) == 1 and figure.axes[0].get_title().startswith("during training")
    plt.close(figure)
    only_metrics = job(row("standard", {"metrics": {"varying_relu": {"layer1": 0.9,
                                                                     "mean": 0.9}}}))
    figure = figures.FIGURES.get("varying_relu_share")(only_metrics, TABLE)
    assert len(figure.axes) == 1 and len(figure.axes[0].patches) == 1
    plt.close(figure)


@pytest.mark.parametrize("name", ["lipschitz_during_training", "varying_relu_share",
                                  "layer_lipschitz_during_training"])
def test_none_without_data(name):
    assert figures.FIGURES.get(name)(job(), TABLE) is None
    empty = job(row("ours", None), row("bcp", {"metrics": {"clean_acc": 0.9},
                                               "history": [{"loss": 1.0, "fit_loss": 1.0}]}))
    assert figures.FIGURES.get(name)(empty, TABLE) is None
    assert figures.render_png(name, empty, TABLE) is None
    assert name not in figures.available(empty, TABLE)


def test_the_figure_specs_quick_rows_fill_their_columns_and_draw(tmp_path):
    """locallip/figure3 and figure2's quick rows cut to 2 epochs on 200 examples: run, assembled
    into both tables, drawn from the real results."""
    spec3, spec2 = load_spec("locallip/figure3"), load_spec("locallip/figure2")
    rows = []
    for row_id, seed, config in row_configs(spec3, "quick", rows=["standard", "ours"]):
        config = dict(config, epochs=2, train_limit=200, test_limit=10,
                      attack={"steps": 2, "restarts": 1})
        rows.append(row(row_id, run_row(config, tmp_path / row_id), seed))
    outcomes = [RowOutcome(r.name, r.seed, "succeeded", r.result["metrics"], result=r.result)
                for r in rows]
    table3 = assemble(spec3, outcomes, "quick")
    cells = {r["id"]: r["cells"] for r in table3["rows"]}
    for row_id in ("standard", "ours"):
        layers = [cells[row_id][f"layer{k}"]["reproduced"] for k in (1, 2)]
        assert all(0 <= share <= 1 for share in layers)
        assert cells[row_id]["mean"]["reproduced"] == pytest.approx(sum(layers) / 2, abs=1e-5)
        assert cells[row_id]["layer3"]["verdict"] == "n/a"  # mlp2x100 has two hidden layers
    assert cells["ours"]["varying_fraction"]["reproduced"] is not None
    assert cells["standard"]["varying_fraction"]["verdict"] == "n/a"  # nominal: not recorded
    table2 = assemble(spec2, outcomes[1:], "quick")
    ours = table2["rows"][0]["cells"]
    assert 0 < ours["local_lipschitz"]["reproduced"] < ours["global_lipschitz"]["reproduced"]
    assert ours["clean_ce"]["reproduced"] > 0 and ours["robust_ce"]["reproduced"] > 0
    assert figures.render_png("varying_relu_share", job(*rows), table3)[:8] == PNG
    assert figures.render_png("lipschitz_during_training", job(*rows), table2)[:8] == PNG
    figure = figures.FIGURES.get("layer_lipschitz_during_training")(job(*rows), table2)
    assert len(figure.axes) == 1  # the Local-Lip-B row: 3 affine layers, both bounds
    assert len(figure.axes[0].lines) == 6
    plt.close(figure)


def test_layer_lipschitz_during_training_has_a_panel_per_row_and_a_line_per_layer():
    def layered(epochs, layers, local=True):
        out = []
        for epoch in range(epochs):
            h = {f"lipschitz.layer{i}": 1.0 + i + epoch for i in range(1, layers + 1)}
            if local:
                h |= {f"local_lipschitz.layer{i}": 0.5 + i for i in range(1, layers + 1)}
            out.append(h | {"lipschitz": 1.0})
        return out
    rows = [row("ours", {"history": layered(3, 3)}),
            row("bcp", {"history": layered(3, 3, local=False)}),
            row("standard", {"history": [{"loss": 1.0}]})]  # no per-layer norms: no panel
    figure = figures.FIGURES.get("layer_lipschitz_during_training")(job(*rows), TABLE)
    ours, bcp = figure.axes
    assert ours.get_title() == "Ours (Local-Lip-B) (seed 0)" and ours.get_yscale() == "log"
    assert [line.get_label() for line in ours.lines] == [
        "layer 1, global", "layer 2, global", "layer 3, global",
        "layer 1, local", "layer 2, local", "layer 3, local"]
    assert list(ours.lines[2].get_ydata()) == pytest.approx([4.0, 5.0, 6.0])
    assert ours.lines[0].get_color() == ours.lines[3].get_color()  # a colour per layer
    assert len(bcp.lines) == 3
    plt.close(figure)
    assert figures.render_png("layer_lipschitz_during_training", job(*rows), TABLE)[:8] == PNG
    assert figures.FIGURES.get("layer_lipschitz_during_training")(job(rows[2]), TABLE) is None

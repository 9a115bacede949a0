"""Table assembly (our numbers beside the paper's, verdicts) and its five renderings."""
from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest

from experiments import TableSpec, load_spec
from orchestrator.report import report_html
from orchestrator.tables import FORMATS, RowOutcome, assemble, metric_value, render


def make_spec(**changes) -> TableSpec:
    source = {"file": "p.txt", "table": "Table 9", "row": "r", "column": "c"}
    data = {
        "name": "t/mixed",
        "paper": {"file": "p.txt", "title": "A paper", "short": "P"},
        "caption": "Errors_in % & more #1",
        "tolerance": 1.0,
        "columns": [
            {"key": "test_err", "label": "Test error", "metric": "clean_acc"},
            {"key": "verified_err", "label": "Verified (MIP)", "metric": "verified_acc.mip"},
            {"key": "ibp_err", "label": "Verified (IBP)", "metric": "verified_acc.ibp"},
        ],
        "defaults": {"method": "ibp"},
        "rows": [
            {"id": "two-seeds", "label": "IBP <&> large_model", "group": "G1",
             "reported": {"test_err": {"value": 2.0, "source": source},
                          "verified_err": {"value": 10.0, "source": source},
                          "ibp_err": {"value": None, "source": source,
                                      "note": "paper: could not verify"}}},
            {"id": "failed", "label": "Failed row", "group": "G1",
             "reported": {"test_err": {"value": 5.0, "source": source}}},
            {"id": "pending", "label": "Pending row", "group": "G2",
             "reported": {"test_err": {"value": 5.0, "source": source}}},
            {"id": "cap", "label": "Wong et al.", "group": "G2",
             "reported": {"test_err": {"value": 1.08, "source": source}}},
            {"id": "off", "label": "Off row", "group": "G2",
             "reported": {"test_err": {"value": 1.0, "source": source}}},
            {"id": "absent", "label": "No outcome", "group": "G3"},
        ],
    }
    data.update(changes)
    return TableSpec.model_validate(data)


def metrics(clean, ibp=None, mip=None):
    verified = {k: v for k, v in (("ibp", ibp), ("mip", mip)) if v is not None}
    return {"clean_acc": clean, "pgd_acc": clean - 0.01, "verified_acc": verified}


OUTCOMES = [
    RowOutcome("two-seeds", 0, "succeeded", metrics(0.98, ibp=0.90, mip=0.905)),
    RowOutcome("two-seeds", 1, "succeeded", metrics(0.97, ibp=0.88, mip=0.895)),
    RowOutcome("failed", 0, "failed", {}, error="CUDA out of memory"),
    RowOutcome("pending", 0, "succeeded", metrics(0.95, ibp=0.5)),
    RowOutcome("pending", 1, "running", {}),
    RowOutcome("cap", 0, "not_implemented", {}, error="method 'cap' is not implemented"),
    RowOutcome("off", 0, "succeeded", metrics(0.9, ibp=0.5)),  # test error 10 vs 1.0
    RowOutcome("ghost", 0, "succeeded", metrics(0.9)),
]


@pytest.fixture
def table():
    return assemble(make_spec(), OUTCOMES, "paper")


def rows_by_id(table):
    return {row["id"]: row for row in table["rows"]}


def test_rows_in_spec_order_only_with_outcomes(table):
    assert [r["id"] for r in table["rows"]] == ["two-seeds", "failed", "pending", "cap", "off"]
    assert table["unmatched_rows"] == ["ghost"]
    assert table["spec"] == "t/mixed" and table["profile"] == "paper" and table["comparable"]
    assert [c["key"] for c in table["columns"]] == ["test_err", "verified_err", "ibp_err"]
    json.dumps(table, allow_nan=False)


def test_two_seeds_mean_std_diff_verdict(table):
    row = rows_by_id(table)["two-seeds"]
    assert row["status"] == "succeeded" and row["seeds"] == [0, 1]
    test = row["cells"]["test_err"]
    assert test["reproduced"] == pytest.approx(2.5)  # errors 2% and 3%
    assert test["n"] == 2
    assert test["std"] == pytest.approx(0.7071067811865476)
    assert test["reported"] == 2.0 and test["diff"] == pytest.approx(0.5)
    assert test["verdict"] == "within"
    verified = row["cells"]["verified_err"]
    assert verified["reproduced"] == pytest.approx(10.0) and verified["verdict"] == "within"
    ibp = row["cells"]["ibp_err"]  # the paper has a dash here
    assert ibp["reproduced"] == pytest.approx(11.0)
    assert ibp["reported"] is None and ibp["diff"] is None
    assert ibp["verdict"] == "not comparable"
    assert ibp["reported_note"] == "paper: could not verify"


def test_off_failed_pending_not_implemented_missing(table):
    rows = rows_by_id(table)
    off = rows["off"]["cells"]["test_err"]
    assert off["reproduced"] == pytest.approx(10.0) and off["diff"] == pytest.approx(9.0)
    assert off["verdict"] == "off" and off["std"] is None and off["n"] == 1
    assert rows["off"]["cells"]["verified_err"]["verdict"] == "n/a"  # mip did not run
    assert rows["off"]["cells"]["verified_err"]["reproduced"] is None

    assert rows["failed"]["status"] == "failed"
    assert rows["failed"]["cells"]["test_err"]["verdict"] == "failed"
    assert rows["failed"]["errors"] == [{"seed": 0, "error": "CUDA out of memory"}]

    pending = rows["pending"]
    assert pending["status"] == "running"
    assert pending["cells"]["test_err"]["verdict"] == "pending"
    assert pending["cells"]["test_err"]["reproduced"] == pytest.approx(5.0)  # seed 0 so far
    assert pending["cells"]["test_err"]["n"] == 1

    cap = rows["cap"]
    assert cap["status"] == "not_implemented"
    assert all(c["verdict"] == "not implemented" for c in cap["cells"].values())
    assert cap["cells"]["test_err"]["reproduced"] is None


def test_tolerance_boundary_and_column_override():
    spec = make_spec()
    outcome = [RowOutcome("off", 0, "succeeded", metrics(0.98))]  # test error 2.0 vs 1.0
    cell = rows_by_id(assemble(spec, outcome, "paper"))["off"]["cells"]["test_err"]
    assert cell["diff"] == pytest.approx(1.0) and cell["verdict"] == "within"
    narrow = make_spec(tolerance=0.5)
    cell = rows_by_id(assemble(narrow, outcome, "paper"))["off"]["cells"]["test_err"]
    assert cell["verdict"] == "off"
    columns = [dict(c) for c in make_spec().model_dump()["columns"]]
    columns[0]["tolerance"] = 2.0
    wide = make_spec(tolerance=0.5, columns=columns)
    cell = rows_by_id(assemble(wide, outcome, "paper"))["off"]["cells"]["test_err"]
    assert cell["verdict"] == "within"


def test_quick_profile_is_not_comparable():
    table = assemble(make_spec(), OUTCOMES, "quick")
    assert not table["comparable"] and "not comparable" in table["note"].lower()
    rows = rows_by_id(table)
    assert rows["off"]["cells"]["test_err"]["verdict"] == "not comparable"
    assert rows["two-seeds"]["cells"]["test_err"]["verdict"] == "not comparable"
    assert rows["two-seeds"]["cells"]["test_err"]["diff"] == pytest.approx(0.5)
    assert rows["pending"]["cells"]["test_err"]["verdict"] == "pending"
    assert rows["cap"]["cells"]["test_err"]["verdict"] == "not implemented"


def test_row_status_partial_and_cancelled():
    outcomes = [RowOutcome("off", 0, "succeeded", metrics(0.9)),
                RowOutcome("off", 1, "failed", {}, error="boom"),
                RowOutcome("failed", 0, "cancelled", {})]
    rows = rows_by_id(assemble(make_spec(), outcomes, "paper"))
    assert rows["off"]["status"] == "partial"
    assert rows["off"]["cells"]["test_err"]["n"] == 1
    assert rows["off"]["cells"]["test_err"]["verdict"] == "off"
    assert rows["failed"]["status"] == "cancelled"
    assert rows["failed"]["cells"]["test_err"]["verdict"] == "cancelled"


def test_bad_inputs():
    with pytest.raises(ValueError, match="quick, paper"):
        assemble(make_spec(), OUTCOMES, "full")
    with pytest.raises(ValueError, match="status"):
        assemble(make_spec(), [RowOutcome("off", 0, "done", {})], "paper")
    with pytest.raises(ValueError) as info:
        render(assemble(make_spec(), OUTCOMES, "paper"), "xlsx")
    assert all(fmt in str(info.value) for fmt in FORMATS)


def test_metric_value():
    m = {"clean_acc": 0.5, "verified_acc": {"ibp": 0.25}, "nan": float("nan")}
    assert metric_value(m, "clean_acc") == 0.5
    assert metric_value(m, "verified_acc.ibp") == 0.25
    assert metric_value(m, "verified_acc.mip") is None
    assert metric_value(m, "nan") is None
    assert metric_value({}, "clean_acc") is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_renders_the_numbers(table, fmt):
    text = render(table, fmt)
    if fmt in ("md", "latex", "html"):
        for number in ("2.50", "(2.00, +0.50)", "10.00 (1.00, +9.00)", "(10.00, +0.00)"):
            assert number in text, (fmt, number)
        assert "n/a" in text and "pending" in text and "not implemented" in text
        assert "failed" in text
    else:  # csv, json: full-precision numbers
        for number in ("2.5", "0.5", "9", "1.08"):
            assert number in text, (fmt, number)


def test_markdown_header_and_cells(table):
    text = render(table, "md")
    assert "Errors_in % & more #1" in text
    assert "Profile 'paper'" in text
    assert "| G1 | IBP <&> large_model | succeeded | 2.50\u00b10.71 (2.00, +0.50) |" in text
    assert "10.00 (1.00, +9.00) *" in text
    quick = render(assemble(make_spec(), OUTCOMES, "quick"), "md")
    assert "NOT comparable with the paper" in quick


def test_json_round_trips(table):
    assert json.loads(render(table, "json")) == table


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.cells, self._in_cell = [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def test_html_is_a_document_and_escapes(table):
    text = render(table, "html")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "IBP &lt;&amp;&gt; large_model" in text
    assert "<&>" not in text
    parser = _Collector()
    parser.feed(text)
    parser.close()
    assert {"html", "head", "body", "table", "tr", "td", "th"} <= set(parser.tags)
    assert "IBP <&> large_model" in parser.cells  # escaped text parses back to the label
    assert "10.00 (1.00, +9.00) *" in parser.cells


def test_latex_escapes(table):
    text = render(table, "latex")
    assert r"\begin{tabular}" in text and r"\end{tabular}" in text
    assert r"Errors\_in \% \& more \#1" in text
    assert r"IBP \textless{}\textbackslash{}" not in text
    assert r"IBP \textless{}\&\textgreater{} large\_model" in text
    assert r"2.50$\pm$0.71 (2.00, +0.50)" in text
    body = text.split(r"\begin{tabular}")[1]
    for line in body.splitlines():
        stripped = line.replace(r"\%", "").replace(r"\_", "").replace(r"\&", "").replace(r"\#", "")
        assert "%" not in stripped and "_" not in stripped and "#" not in stripped
    row = next(line for line in body.splitlines() if line.startswith("G1 & IBP"))
    assert row.count(" & ") == 5  # group, row, status + 3 columns


def test_csv_parses_with_separate_columns(table):
    reader = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    assert [r["row_id"] for r in reader] == ["two-seeds", "failed", "pending", "cap", "off"]
    for key in ("test_err", "verified_err", "ibp_err"):
        for part in ("ours", "paper", "diff", "verdict"):
            assert f"{key}_{part}" in reader[0]
    first = reader[0]
    assert float(first["test_err_ours"]) == pytest.approx(2.5)
    assert float(first["test_err_paper"]) == 2.0
    assert float(first["test_err_diff"]) == pytest.approx(0.5)
    assert first["test_err_verdict"] == "within"
    assert first["ibp_err_paper"] == "" and first["ibp_err_verdict"] == "not comparable"
    assert first["label"] == "IBP <&> large_model"
    assert reader[1]["test_err_ours"] == "" and reader[1]["test_err_verdict"] == "failed"


def test_real_spec_table_renders():
    spec = load_spec("ibp/table4")
    outcomes = [RowOutcome("mnist-eps0.3-ibp", 0, "succeeded",
                           {"clean_acc": 0.983, "pgd_acc": 0.94, "verified_acc": {"ibp": 0.91}}),
                RowOutcome("mnist-eps0.3-wong", 0, "not_implemented", {})]
    table = assemble(spec, outcomes, "paper")
    cells = rows_by_id(table)["mnist-eps0.3-ibp"]["cells"]
    assert cells["test_err"]["reported"] == 1.66
    assert cells["test_err"]["reproduced"] == pytest.approx(1.7)
    assert cells["test_err"]["verdict"] == "within"
    assert cells["verified_err"]["verdict"] == "n/a"  # no mip certifier yet
    assert cells["ibp_verified_err"]["reproduced"] == pytest.approx(9.0)
    for fmt in FORMATS:
        assert render(table, fmt)


def aggregate_spec() -> TableSpec:
    source = {"file": "p.txt", "table": "Table 2", "row": "r", "column": "c"}
    columns = [{"key": f"err_{agg}", "label": agg, "metric": "verified_acc.ibp",
                "aggregate": agg} for agg in ("mean", "std", "median", "q1", "q3", "best", "worst")]
    columns += [{"key": "sec", "label": "s/epoch", "metric": "sec_per_epoch", "block": "timing",
                 "reduce": "mean", "transform": "raw"},
                {"key": "last_loss", "label": "final loss", "metric": "loss", "block": "history",
                 "reduce": "last", "transform": "raw"}]
    return TableSpec.model_validate({
        "name": "t/aggregate", "paper": {"file": "p.txt", "title": "A paper", "short": "P"},
        "caption": "aggregates", "tolerance": 1.0, "seeds": [0, 1, 2, 3, 4],
        "columns": columns, "defaults": {"method": "ibp"},
        "rows": [{"id": "r", "label": "row",
                  "reported": {"err_median": {"value": 20.0, "source": source}}}]})


def test_aggregates_over_seeds_and_per_epoch_blocks():
    """Five seeds with verified accuracies 0.9, 0.8, 0.7, 0.6, 0.5 (errors 10..50 %)."""
    outcomes = []
    for seed, acc in enumerate([0.9, 0.8, 0.7, 0.6, 0.5]):
        result = {"timing": {"sec_per_epoch": [1.0 + seed, 3.0 + seed]},
                  "history": [{"loss": 2.0}, {"loss": 1.0 - 0.1 * seed}]}
        outcomes.append(RowOutcome("r", seed, "succeeded", metrics(0.95, ibp=acc), None, result))
    cells = assemble(aggregate_spec(), outcomes, "paper")["rows"][0]["cells"]
    value = {key: cell["reproduced"] for key, cell in cells.items()}
    assert value["err_mean"] == pytest.approx(30.0) and cells["err_mean"]["std"] is not None
    assert value["err_std"] == pytest.approx(15.811388, abs=1e-5)
    assert value["err_median"] == pytest.approx(30.0)
    assert value["err_q1"] == pytest.approx(20.0) and value["err_q3"] == pytest.approx(40.0)
    assert value["err_best"] == pytest.approx(10.0)  # the run with the highest accuracy
    assert value["err_worst"] == pytest.approx(50.0)
    assert value["sec"] == pytest.approx(4.0)  # mean over epochs, then over seeds: (2+..+6)/5
    assert value["last_loss"] == pytest.approx(0.8)  # last epoch: 1.0 .. 0.6, mean 0.8
    assert cells["err_median"]["verdict"] == "off" and cells["err_median"]["diff"] == 10.0
    assert cells["err_median"]["std"] is None  # a statistic of its own, no spread beside it


def test_timing_table_speedups_and_devices():
    """BCP Table 1 as the paper prints it: the speed-up of BCP over CAP in each group, ours from
    hand-made timings and the paper's from its own cells (its x12.0, x12.2, x24.2), with the
    device the runs ran on in every format."""
    spec = load_spec("bcp/table1")
    seconds = {"cap": 100.0, "bcp": 8.0}
    outcomes = []
    for row in spec.rows:
        method = row.config["method"]
        result = {"timing": {"sec_per_epoch": [seconds[method] - 1, seconds[method] + 1]},
                  "device": "NVIDIA H200"}
        outcomes.append(RowOutcome(row.id, 0, "succeeded", metrics(0.9), None, result))
    table = assemble(spec, outcomes, "paper")
    cells = {row["id"]: row["cells"]["sec_per_epoch"] for row in table["rows"]}
    assert cells["mnist-4c3f-bcp"]["speedup"] == pytest.approx(12.5)
    assert cells["mnist-4c3f-cap"]["speedup"] == pytest.approx(1.0)
    paper = {key: cell["speedup_reported"] for key, cell in cells.items()}
    assert round(paper["mnist-4c3f-bcp"], 1) == 12.0
    assert round(paper["cifar10-4c3f-bcp"], 1) == 12.2
    assert round(paper["cifar10-6c2f-bcp"], 1) == 24.2
    assert paper["tinyimagenet-8c2f-bcp"] is None  # the paper has no CAP time there
    assert table["devices"] == ["NVIDIA H200"]
    assert "Speed-up over CAP" in render(table, "md")
    assert "x12.5 (x12.0)" in render(table, "md")
    assert "Ran on: NVIDIA H200." in render(table, "md")
    assert "Ran on: NVIDIA H200." in render(table, "latex") and "x12.5 (x12.0)" in render(table, "html")
    rows = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    bcp = next(r for r in rows if r["row_id"] == "mnist-4c3f-bcp")
    job = SimpleNamespace(id="j1", spec="bcp/table1", profile="paper", kind="table",
                          status="succeeded", created_at="t0", updated_at="t1", error=None, rows=[])
    page = report_html(job, table, [])
    assert '<p id="devices">Ran on: NVIDIA H200.</p>' in page
    assert "speed-up over CAP" in page and ">x12.5</td>" in page and ">x12.0</td>" in page
    assert float(bcp["sec_per_epoch_speedup_ours"]) == pytest.approx(12.5)
    assert bcp["devices"] == "NVIDIA H200"


def test_speedup_over_must_name_a_row_of_a_timing_column():
    base = aggregate_spec().model_dump()
    timing = next(c for c in base["columns"] if c["key"] == "sec")
    timing["speedup_over"] = "no such row"
    with pytest.raises(ValueError, match="speedup_over 'no such row' is no row's label"):
        TableSpec.model_validate(base)
    timing["speedup_over"] = None
    next(c for c in base["columns"] if c["key"] == "err_mean")["speedup_over"] = "row"
    with pytest.raises(ValueError, match="speedup_over applies to timing columns only"):
        TableSpec.model_validate(base)


def test_tiny_raw_numbers_keep_their_value():
    """IBP Figure 4's polytope area is ~1e-7 late in training: our number keeps its significant
    digits (rounding to 1e-6 once showed it as 0)."""
    spec = load_spec("ibp/figure4")
    outcome = RowOutcome("step800", 0, "succeeded",
                         {"bound_area": {"polytope": 9.8123456789e-8, "ibp": 5.6e-5,
                                         "fill": 0.00175}}, None, {})
    table = assemble(spec, [outcome], "quick")
    cells = table["rows"][0]["cells"]
    assert cells["polytope_area"]["reproduced"] == pytest.approx(9.8123456789e-8, rel=1e-8)
    assert cells["fill"]["reproduced"] == pytest.approx(0.175)
    assert "9.812e-08" in render(table, "md")

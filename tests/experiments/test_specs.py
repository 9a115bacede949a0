"""The experiment specs: every file loads, every row config is complete and (where its method and
certifiers exist) a valid RunConfig, the reported numbers are the paper's, and mistakes give
errors that say what is allowed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import experiments
from experiments import (PROFILES, REQUIRED_CONFIG_FIELDS, SpecError, UnknownRow, UnknownSpec,
                         deep_merge, list_specs, load_spec, load_spec_file, row_configs,
                         spec_summary)
from workers.core.certify import CERTIFIERS
from workers.core.config import RunConfig, resolve
from workers.core.methods import METHODS
from workers.core.models import MODELS

PAPERS = Path(__file__).resolve().parents[3] / "shared" / "papers"
SPECS = list_specs()
IBP_FILE = "004_14b043c9c7a4d7b5.txt"


def test_the_known_specs_are_listed():
    assert {"demo/digits", "ibp/table3", "ibp/table4"} <= set(SPECS)
    assert SPECS == sorted(SPECS)


@pytest.mark.parametrize("name", SPECS)
def test_spec_loads_and_summarizes(name):
    spec = load_spec(name)
    assert spec.name == name
    summary = spec_summary(spec)
    json.dumps(summary)  # JSON-ready
    assert summary["name"] == name
    assert summary["profiles"] == ["quick", "paper", "smoke"]
    assert [r["id"] for r in summary["rows"]] == [r.id for r in spec.rows]
    assert all(r["methods"] for r in summary["rows"])


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("profile", PROFILES)
def test_row_configs_are_complete_and_valid(name, profile):
    spec = load_spec(name)
    configs = row_configs(spec, profile)
    # spec order, each row once per seed (its own seeds or the spec's)
    assert [row_id for row_id, _, _ in configs] == [r.id for r in spec.rows
                                                    for _ in (r.seeds or spec.seeds)]
    validated = 0
    for row_id, seed, config in configs:
        missing = [f for f in REQUIRED_CONFIG_FIELDS if f not in config]
        assert not missing, f"{name} {profile} {row_id}: missing {missing}"
        assert config["seed"] == seed
        if config["method"] not in METHODS:
            continue  # e.g. Wong et al. ("cap"): listable, not implemented yet
        if config["model"] not in MODELS:
            continue  # e.g. BCP's WRN, not defined in its paper's text: not implemented yet
        available = [c for c in config["certifiers"] if c in CERTIFIERS]
        if not available:
            continue
        resolved = resolve(RunConfig.model_validate({**config, "certifiers": available}))
        assert resolved.eps_train is not None
        validated += 1
    # a spec whose methods (or models) are all still being built loads and lists, and validates none
    assert validated > 0 or all(c["method"] not in METHODS or c["model"] not in MODELS
                                for _, _, c in configs)


@pytest.mark.parametrize("name", SPECS)
def test_row_ids_unique_and_url_safe(name):
    ids = [row.id for row in load_spec(name).rows]
    assert len(ids) == len(set(ids))
    for row_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", row_id), row_id


@pytest.mark.parametrize("name", SPECS)
def test_every_reported_value_has_a_source(name):
    spec = load_spec(name)
    columns = {c.key for c in spec.columns}
    for row in spec.rows:
        for key, reported in row.reported.items():
            assert key in columns
            if reported.value is not None:
                source = reported.source
                assert source is not None, (row.id, key)
                assert source.file == spec.paper.file
                assert (PAPERS / source.file).name == source.file
                assert source.table and source.row and source.column
            else:
                assert reported.note


def _reported(name: str, row_id: str, column: str) -> float | None:
    return load_spec(name).row(row_id).reported[column].value


def test_table4_numbers_are_the_papers():
    assert _reported("ibp/table4", "mnist-eps0.3-ibp", "verified_err") == 8.05
    assert _reported("ibp/table4", "mnist-eps0.3-ibp", "test_err") == 1.66
    assert _reported("ibp/table4", "mnist-eps0.3-ibp", "pgd_err") == 6.12
    assert _reported("ibp/table4", "cifar10-eps8_255-ibp", "pgd_err") == 65.23
    assert _reported("ibp/table4", "cifar10-eps2_255-wong", "verified_err") == 49.96
    assert _reported("ibp/table4", "svhn-eps0.01-nominal", "test_err") == 5.13
    assert _reported("ibp/table4", "mnist-eps0.1-madry", "pgd_err") == 1.34
    # A dash in the paper: null, with the reason.
    dash = load_spec("ibp/table4").row("mnist-eps0.3-madry").reported["verified_err"]
    assert dash.value is None and dash.note == "paper: could not verify"
    assert dash.source.table == "Table 4"
    # The IBP-verified column is ours: no reported value.
    assert "ibp_verified_err" not in load_spec("ibp/table4").row("mnist-eps0.3-ibp").reported


def test_table4_has_the_trained_rows_only():
    spec = load_spec("ibp/table4")
    methods = {}
    for row_id, _, config in row_configs(spec, "paper"):
        methods.setdefault(config["method"], []).append(row_id)
    assert len(methods["ibp"]) == 7 and len(methods["nominal"]) == 7 and len(methods["pgd"]) == 7
    assert len(methods["cap"]) == 6  # no Wong et al. row at MNIST eps = 0.4
    assert set(methods) == {"nominal", "pgd", "cap", "ibp"}
    assert not any("literature" in row.label.lower() or "xiao" in row.label.lower()
                   for row in spec.rows)


def test_table4_paper_protocol():
    spec = load_spec("ibp/table4")
    configs = {row_id: config for row_id, _, config in row_configs(spec, "paper")}
    mnist = configs["mnist-eps0.3-ibp"]
    assert (mnist["dataset"], mnist["epochs"], mnist["batch_size"]) == ("mnist", 100, 100)
    assert mnist["model"] == "large" and mnist["eps"] == 0.3 and mnist["eps_train"] == 0.4
    assert mnist["optimizer"]["lr_milestones"] == pytest.approx([25, 25_000 / 600])
    assert mnist["schedule"] == pytest.approx({"warmup_epochs": 2000 / 600,
                                               "rampup_epochs": 10_000 / 600})
    assert mnist["attack"] == {"steps": 200, "restarts": 10}
    assert mnist["certifiers"] == ["ibp", "mip"]
    assert configs["mnist-eps0.1-ibp"]["model"] == "medium"
    cifar = configs["cifar10-eps8_255-ibp"]
    assert (cifar["epochs"], cifar["batch_size"]) == (3200, 1600)
    assert cifar["eps"] == pytest.approx(8 / 255)
    assert cifar["eps_train"] == pytest.approx(1.1 * 8 / 255)  # 10% higher (appendix A)
    assert cifar["schedule"] == {"warmup_epochs": 160.0, "rampup_epochs": 1600.0}
    assert configs["cifar10-eps8_255-madry"]["eps_train"] == pytest.approx(8 / 255)
    svhn = configs["svhn-eps0.01-ibp"]
    assert (svhn["epochs"], svhn["batch_size"]) == (2200, 50)
    assert svhn["eps_train"] == pytest.approx(0.011)


def test_quick_profile_is_small():
    for name in ("ibp/table3", "ibp/table4"):
        for row_id, _, config in row_configs(load_spec(name), "quick"):
            assert config["dataset"] in ("digits", "mnist-idx"), row_id
            assert "data_root" not in config
            # Wong et al.'s rows: exact CAP, affordable on the 2x100 MLP only.
            assert config["model"] == ("mlp2x100" if config["method"] == "cap" else "small")
            assert config["epochs"] <= 20 and config["test_limit"] <= 200
            assert config["attack"] == {"steps": 20, "restarts": 1}
            if config["dataset"] == "mnist-idx":
                assert row_id.startswith("mnist-")
            if config["method"] in ("ibp", "pgd"):  # an eps ramp that fits the quick epochs
                schedule = config["schedule"]
                assert schedule["warmup_epochs"] + schedule["rampup_epochs"] < config["epochs"]


def test_demo_profiles_are_the_same():
    spec = load_spec("demo/digits")
    assert row_configs(spec, "quick") == row_configs(spec, "paper")
    config = row_configs(spec, "paper", ["ibp"])[0][2]
    assert config["eps"] == 0.1 and config["eps_train"] == 0.15 and config["epochs"] == 20
    assert config["certifiers"] == ["ibp"]
    for row in spec.rows:
        assert all(r.value is None and r.note == "no paper numbers: demo"
                   for r in row.reported.values())


def test_table3_numbers_and_configs():
    t3, t4 = load_spec("ibp/table3"), load_spec("ibp/table4")
    assert _reported("ibp/table3", "mnist-eps0.1-ibp", "ibp_bound") == 2.92
    assert _reported("ibp/table3", "mnist-eps0.1-ibp", "mip_bound") == 2.23
    assert _reported("ibp/table3", "svhn-eps0.01-ibp", "ibp_bound") == 39.35
    assert _reported("ibp/table3", "cifar10-eps8_255-ibp", "mip_bound") == 67.96
    assert len(t3.rows) == 7
    # Its configs are those of Table 4's IBP rows, and its MIP bound is Table 4's verified error.
    for profile in PROFILES:
        ours = {r: c for r, _, c in row_configs(t3, profile)}
        theirs = {r: c for r, _, c in row_configs(t4, profile, list(ours))}
        assert ours == theirs
    for row in t3.rows:
        assert row.reported["mip_bound"].value == t4.row(row.id).reported["verified_err"].value


def test_reported_numbers_appear_in_the_paper_text():
    if not (PAPERS / IBP_FILE).exists():
        pytest.skip("papers not available")
    text = (PAPERS / IBP_FILE).read_text(encoding="utf-8")
    for name in ("ibp/table3", "ibp/table4"):
        for row in load_spec(name).rows:
            for reported in row.reported.values():
                if reported.value is not None:
                    assert f"{reported.value:.2f}%" in text, (name, row.id, reported.value)


def test_row_selection_and_seeds():
    spec = load_spec("ibp/table4")
    selected = row_configs(spec, "quick", ["mnist-eps0.3-ibp", "mnist-eps0.1-nominal"], [0, 1])
    # spec order, then seeds
    assert [(r, s) for r, s, _ in selected] == [("mnist-eps0.1-nominal", 0),
                                                ("mnist-eps0.1-nominal", 1),
                                                ("mnist-eps0.3-ibp", 0), ("mnist-eps0.3-ibp", 1)]
    assert [c["seed"] for _, _, c in selected] == [0, 1, 0, 1]
    # configs are fresh copies
    selected[0][2]["optimizer"]["lr"] = 99
    assert row_configs(spec, "quick", ["mnist-eps0.1-nominal"])[0][2]["optimizer"]["lr"] == 0.001


def test_unknown_spec_lists_known():
    with pytest.raises(UnknownSpec) as info:
        load_spec("ibp/table99")
    assert isinstance(info.value, ValueError)
    assert "ibp/table4" in str(info.value) and "demo/digits" in str(info.value)


def test_unknown_row_lists_rows():
    spec = load_spec("demo/digits")
    with pytest.raises(UnknownRow) as info:
        row_configs(spec, "quick", ["ibp", "nope"])
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'nope'" in message and "nominal, pgd, ibp" in message


def test_bad_profile_lists_profiles():
    with pytest.raises(ValueError) as info:
        row_configs(load_spec("demo/digits"), "fast")
    assert "quick" in str(info.value) and "paper" in str(info.value)


def test_bad_seeds():
    with pytest.raises(ValueError):
        row_configs(load_spec("demo/digits"), "quick", seeds=[-1])


def test_deep_merge():
    base = {"a": 1, "opt": {"lr": 1, "milestones": [1, 2]}, "keep": {"x": 1}}
    out = deep_merge(base, {"opt": {"milestones": [3]}, "b": 2}, None, {"keep": None})
    assert out == {"a": 1, "opt": {"lr": 1, "milestones": [3]}, "keep": None, "b": 2}
    assert base["opt"]["milestones"] == [1, 2]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


VALID = """\
name: t/one
paper: {file: null, title: test, short: t}
caption: a test table
tolerance: 1.0
columns:
  - {key: test_err, label: Test error, metric: clean_acc}
x-block: &block {dataset: digits}
defaults: {method: nominal, model: small, norm: linf, eps: 0.1, epochs: 1, batch_size: 8,
           certifiers: [ibp]}
rows:
  - id: a
    label: A
    config: {<<: *block}
    reported:
      test_err: {value: 1.5, source: {file: f.txt, table: Table 1, row: A, column: Test}}
"""


def test_valid_temp_spec_loads(tmp_path):
    _write(tmp_path, "t/one", VALID)
    assert list_specs(tmp_path) == ["t/one"]
    spec = load_spec("t/one", root=tmp_path)
    assert row_configs(spec)[0][2]["dataset"] == "digits"


def test_unknown_field_is_a_clear_spec_error(tmp_path):
    path = _write(tmp_path, "t/one", VALID.replace("    label: A\n", "    label: A\n    colour: red\n"))
    with pytest.raises(SpecError) as info:
        load_spec_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "rows[0](id=a).colour: unknown field" in message
    assert "allowed: id, label" in message


def test_schema_errors_name_the_field(tmp_path):
    cases = {
        "transform": (VALID.replace("metric: clean_acc}", "metric: clean_acc, transform: pct}"),
                      "columns[0].transform"),
        "source": (VALID.replace(", source: {file: f.txt, table: Table 1, row: A, column: Test}", ""),
                   "needs its source"),
        "id": (VALID.replace("  - id: a\n", "  - id: a/b\n"), "not url-safe"),
        "column": (VALID.replace("      test_err:", "      pgd_err:"), "unknown columns"),
        "missing": (VALID.replace("caption: a test table\n", ""), "caption: required field missing"),
        "yaml": (VALID + "  - [unclosed\n", "not valid YAML"),
    }
    for key, (text, expected) in cases.items():
        path = _write(tmp_path, f"t/{key}", text)
        with pytest.raises(SpecError) as info:
            load_spec_file(path)
        assert expected in str(info.value), (key, str(info.value))


def test_name_must_match_path(tmp_path):
    _write(tmp_path, "t/other", VALID)
    with pytest.raises(SpecError, match="name"):
        load_spec("t/other", root=tmp_path)


def test_package_exports_the_loader_api():
    for name in ("list_specs", "load_spec", "row_configs", "spec_summary", "SpecError",
                 "UnknownSpec", "UnknownRow", "TableSpec"):
        assert hasattr(experiments, name)

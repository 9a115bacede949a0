"""The specs of every table and figure of the four papers (issue 6): each loads and validates, each
reported number has a source in its paper's file (and, where shared/papers is present, stands in
that file), each spec has the rows of its table but those left out on purpose (listed here with
the reason), and each quick-profile row config is a valid RunConfig where its method, model and
certifiers exist (the others are listed here as not implemented, with what they wait on)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from experiments import PROFILES, load_spec, list_specs, row_configs
from workers.core.certify import CERTIFIERS
from workers.core.config import RunConfig, resolve
from workers.core.data import DATASETS
from workers.core.methods import METHODS
from workers.core.models import MODELS

PAPERS = Path(__file__).resolve().parents[3] / "shared" / "papers"
BCP, LOCALLIP, CROWN003, IBP = ("001_9feb4b9d9922fe2b.txt", "002_57303698f5345a88.txt",
                                "003_b69ee21a14f9c5e8.txt", "004_14b043c9c7a4d7b5.txt")

# spec -> (the paper's file, rows of the paper's table or figure, {left-out row: why})
TABLES: dict[str, tuple[str, int, dict[str, str]]] = {
    # the specs that were there before issue 6
    "ibp/table3": (IBP, 7, {}),
    "ibp/table4": (IBP, 42, {
        **{f"mnist-eps0.1-lit-{k}": "Reported in literature (Xiao, Wong, Dvijotham et al.)"
           for k in range(3)},
        "mnist-eps0.2-lit-0": "Reported in literature (Xiao et al.)",
        **{f"mnist-eps0.3-lit-{k}": "Reported in literature (Madry, Xiao, Wong et al.)"
           for k in range(3)},
        **{f"cifar10-eps2_255-lit-{k}": "Reported in literature (Xiao, Wong et al.)"
           for k in range(2)},
        **{f"cifar10-eps8_255-lit-{k}": "Reported in literature (Madry, Xiao, Wong, Dvijotham)"
           for k in range(4)},
        **{f"svhn-eps0.01-lit-{k}": "Reported in literature (Wong and Kolter, Dvijotham et al.)"
           for k in range(2)}}),
    "crown003/table3": (CROWN003, 22, {}),
    "locallip/table6": (LOCALLIP, 4, {}),
    "bcp/table1": (BCP, 10, {}),
    "bcp/table2": (BCP, 15, {}),
    "locallip/table1": (LOCALLIP, 4, {}),
    "locallip/table2": (LOCALLIP, 37, {}),
    "locallip/table5": (LOCALLIP, 5, {}),
    "locallip/table7": (LOCALLIP, 16, {}),
    # figures: a row per plotted series (per point where the x axis is a config field)
    "locallip/figure2": (LOCALLIP, 2, {}),  # Local-Lip-B and BCP training curves
    "locallip/figure3": (LOCALLIP, 3, {}),  # standard, BCP, Local-Lip-B
    "bcp/figure3": (BCP, 3, {}),  # MNIST, CIFAR-10, Tiny ImageNet
    # 3 panels x methods x 5 eps_eval points of our grid (the text gives no x values)
    "bcp/figure4": (BCP, 3 * 5 + 2 * 4 * 5, {}),
    "ibp/table2": (IBP, 3, {}),
    # (method, model, eps_train, eps): IBP 3 x 4 x 4, Wong et al. 2 x 4 x 4, Madry et al. 3 x 4 x 4
    "ibp/figure3": (IBP, 48 + 32 + 48, {}),
    "ibp/figure4": (IBP, 3, {"step0": "training step 0 is the untrained network: no run"}),
    "ibp/table5": (IBP, 12, {}),
    "ibp/table6": (IBP, 34, {
        **{f"mnist-eps0.1-lit-{k}": "Reported in literature" for k in range(6)},
        **{f"mnist-eps0.3-lit-{k}": "Reported in literature" for k in range(6)},
        **{f"cifar10-eps1_510-lit-{k}": "Reported in literature (Mirman et al.)" for k in range(2)},
        **{f"cifar10-eps2_255-lit-{k}": "Reported in literature" for k in range(6)},
        **{f"cifar10-eps8_255-lit-{k}": "Reported in literature (Wong et al.)" for k in range(2)}}),
    "crown003/table1": (CROWN003, 32, {
        "mnist-best-of-pv": "Best of PV (Dvijotham et al. 2018a): another paper's result",
        "mnist-best-of-rs": "Best of RS (Xiao et al. 2018): another paper's result",
        "mnist-dai-large": "DAI (Mirman et al. 2018): another paper's result",
        "cifar10-dai-large": "DAI (Mirman et al. 2018): another paper's result",
        "mnist-ibp-xlarge": "IBP (Gowal et al. 2018): the IBP paper's result (spec ibp/table4)",
        "cifar10-2_255-ibp-xlarge": "IBP (Gowal et al. 2018): the IBP paper's result (ibp/table4)",
        "cifar10-8_255-ibp-xlarge": "IBP (Gowal et al. 2018): the IBP paper's result (ibp/table4)"}),
    "crown003/table2": (CROWN003, 4, {
        "gowal": "Gowal et al. (2018): the IBP paper's result (spec ibp/table4)",
        "ci-orig": "CI Orig: copied from Zhang et al. (2019b); its config is CI ReImp's"}),
    "crown003/table4": (CROWN003, 30, {
        f"model-{m}-copied": "Copied: results of Zhang et al. (2019b); config = Baseline's"
        for m in "abcdefghij"}),
    "locallip/table4": (LOCALLIP, 4, {}),
}

FAMILY_LARGE = "models cibp_large_a-h (Zhang et al.'s large family, not defined in 003's text)"

# spec -> {row id: what it waits on}; every other row's quick config is a valid RunConfig
NOT_IMPLEMENTED: dict[str, dict[str, str]] = {
    "bcp/table1": {"cifar10-wrn-cap": "model WRN (not defined in the BCP text)",
                   "cifar10-wrn-bcp": "model WRN (not defined in the BCP text)"},
    "bcp/table2": {"cifar10-wrn-cap": "model WRN (not defined in the BCP text)",
                   "cifar10-wrn-lmt": "model WRN (not defined in the BCP text)",
                   "cifar10-wrn-bcp": "model WRN (not defined in the BCP text)"},
    "locallip/table2": {
        "cifar10-4c3f-relu-stability": "method relu_stability (Xiao et al. with l2 adversarial "
                                       "training) and certifier alpha_beta_crown",
        "cifar10-6c2f-cayley-maxmin": "method cayley (orthogonal layers, not defined in the text)",
        "tinyimagenet-7c1f-standard": "model 7C1F (not defined in the text)",
        "tinyimagenet-7c1f-gloro": "model 7C1F (not defined in the text)"},
    "ibp/table2": {row: "data set imagenet64 (downscaled ImageNet) and model wrn-10-10"
                   for row in ("nominal", "madry", "ibp")},
    "crown003/table2": {"ci-reimp": FAMILY_LARGE, "ci-reg": FAMILY_LARGE},
    "crown003/table4": {f"model-{m}-{kind}": f"model cibp_small_{m} (Zhang et al.'s small "
                        "family, not defined in 003's text)"
                        for m in "abcdefghij" for kind in ("baseline", "reg")},
}


def test_every_paper_spec_is_listed():
    # every spec but the demo is a paper's table or figure, and has its row count here
    assert set(TABLES) == set(list_specs()) - {"demo/digits"}
    assert set(NOT_IMPLEMENTED) <= set(TABLES)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_row_count_matches_the_paper(name):
    paper_file, total, left_out = TABLES[name]
    spec = load_spec(name)
    assert spec.paper.file == paper_file
    ids = [row.id for row in spec.rows]
    assert len(ids) == total - len(left_out), (name, len(ids), total, sorted(left_out))
    assert not set(left_out) & set(ids)
    assert all(reason.strip() for reason in left_out.values())


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_reported_number_has_its_papers_source(name):
    spec = load_spec(name)
    for row in spec.rows:
        for key, reported in row.reported.items():
            if reported.value is None:
                assert reported.note, (name, row.id, key)
                continue
            source = reported.source
            assert source is not None and source.file == spec.paper.file, (name, row.id, key)
            assert source.table and source.row and source.column


def _unavailable(config: dict) -> list[str]:
    missing = [f"method {config['method']}"] if config["method"] not in METHODS else []
    missing += [f"model {config['model']}"] if config["model"] not in MODELS else []
    missing += [f"dataset {config['dataset']}"] if config["dataset"] not in DATASETS else []
    missing += [f"certifier {c}" for c in config["certifiers"] if c not in CERTIFIERS]
    return missing


@pytest.mark.parametrize("name", sorted(TABLES))
@pytest.mark.parametrize("profile", PROFILES)
def test_row_configs_validate_or_are_listed_as_not_implemented(name, profile):
    spec = load_spec(name)
    waiting = NOT_IMPLEMENTED.get(name, {})
    assert set(waiting) <= {row.id for row in spec.rows}
    unavailable = {}
    for row_id, _, config in row_configs(spec, profile):
        missing = _unavailable(config)
        if missing:
            unavailable[row_id] = missing
            continue
        resolve(RunConfig.model_validate(config))
    if profile == "paper":
        assert set(unavailable) == set(waiting), (name, unavailable)
    else:  # a quick profile may stand in a small registered model for one that does not exist
        assert set(unavailable) <= set(waiting), (name, unavailable)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_quick_profile_is_a_cpu_minute(name):
    for row_id, _, config in row_configs(load_spec(name), "quick"):
        assert config["dataset"] in ("digits", "digits-8x8", "mnist-idx", "toy2d"), row_id
        assert config.get("device", "cpu") == "cpu", row_id
        assert "data_root" not in config
        # toy2d: 13 points, one step per epoch (IBP Figure 4 trains 800 steps in seconds)
        assert config["epochs"] <= (800 if config["dataset"] == "toy2d" else 20), row_id
        assert config.get("test_limit") is not None and config["test_limit"] <= 200, row_id
        if config["dataset"] == "mnist-idx":
            assert config.get("train_limit") and config["train_limit"] <= 5000, row_id
        attack = config.get("attack") or {}
        assert attack.get("steps", 200) <= 20 and attack.get("restarts", 10) == 1, row_id


def number_forms(value: float) -> list[str]:
    """How a number may be printed in a paper's text: 64.70 as '64.70' or '64.7', 1369 as '1,369'."""
    forms = {f"{value:.2f}", f"{value:.1f}", f"{value:g}"}
    if 0 < value < 1:  # '± .08'
        forms |= {form[1:] for form in forms if form.startswith("0.")}
    if value == int(value):
        forms |= {str(int(value)), f"{int(value):,}"}
    return sorted(forms, key=len, reverse=True)


def number_in_text(value: float, text: str) -> bool:
    """The number stands in the text as a whole number (not inside a longer one). The extracted
    text of 003 writes the digit 0 as the letter O inside numbers ('53.O9'): read as 0."""
    text = re.sub(r"(?<=[\d.])O|O(?=[\d.])", "0", text)
    for form in number_forms(value):
        if re.search(rf"(?<![\d.,]){re.escape(form)}(?![\d])", text):
            return True
    return False


GARBLED = re.compile(r"garbled|text shows|text:", re.IGNORECASE)
COMMON = {"the", "and", "with", "eps", "lambda", "gamma", "model", "mean", "std", "ours", "text",
          "section", "all", "for", "per", "average"}


def words(label: str) -> set[str]:
    """The words of a source row or column label worth looking for (3+ letters, not generic)."""
    return {w.lower() for w in re.findall(r"[A-Za-z][A-Za-z-]{2,}", label)} - COMMON


def near(value: float, label: str, text: str, before: int, after: int = 300) -> bool:
    """Some word of `label` stands within `before` characters before (or `after` after) an
    occurrence of the number in the text: the source names the right part of the paper."""
    wanted = words(label)
    if not wanted:
        return True
    text = re.sub(r"(?<=[\d.])O|O(?=[\d.])", "0", text)
    for form in number_forms(value):
        for match in re.finditer(rf"(?<![\d.,]){re.escape(form)}(?![\d])", text):
            window = text[max(0, match.start() - before):match.end() + after].lower()
            if any(w in window for w in wanted):
                return True
    return False


@pytest.mark.parametrize("name", sorted(TABLES))
def test_reported_numbers_stand_in_the_paper_text(name):
    paper_file = TABLES[name][0]
    if not (PAPERS / paper_file).exists():
        pytest.skip("papers not available")
    text = (PAPERS / paper_file).read_text(encoding="utf-8")
    for row in load_spec(name).rows:
        for key, reported in row.reported.items():
            if reported.value is None:
                continue
            assert reported.source.table.split(",")[0] in text, (name, row.id, key)
            if reported.note and GARBLED.search(reported.note):
                continue  # read from a garbled cell: the note says what the text shows
            assert number_in_text(reported.value, text), (name, row.id, key, reported.value)
            source = reported.source
            assert near(reported.value, source.row, text, before=1500), (
                name, row.id, key, source.row)
            assert near(reported.value, source.column, text, before=6000), (
                name, row.id, key, source.column)


def test_number_forms():
    assert number_in_text(64.70, "BCP 92.41 64.70 47.95")
    assert number_in_text(1369, "6C2F 1,369 56.5")
    assert not number_in_text(4.7, "14.70")
    assert not number_in_text(64.7, "164.71")
    assert number_in_text(53.09, "5e-5 O 53.O9 37.77")


SCHEMA_BASE = """\
name: t/agg
paper: {file: null, title: test, short: t}
caption: a test table
tolerance: 1.0
defaults: {method: nominal, dataset: digits, model: small, norm: linf, eps: 0.1, epochs: 1,
           batch_size: 8, certifiers: [ibp]}
"""


def _spec(tmp_path, body: str):
    from experiments import load_spec_file
    path = tmp_path / "t" / "agg.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SCHEMA_BASE + body, encoding="utf-8")
    return load_spec_file(path)


def test_schema_aggregates_over_seeds_and_reads_timing(tmp_path):
    from experiments import SpecError
    spec = _spec(tmp_path, """\
seeds: [0, 1, 2]
columns:
  - {key: acc, label: Acc, metric: clean_acc, aggregate: mean}
  - {key: acc_std, label: Acc std, metric: clean_acc, aggregate: std}
  - {key: time, label: s/epoch, metric: sec_per_epoch, block: timing, reduce: mean, transform: raw}
rows:
  - {id: a, label: A}
""")
    assert [c.aggregate for c in spec.columns] == ["mean", "std", "single"]
    assert spec.columns[2].block == "timing" and spec.columns[2].reduce == "mean"
    # defaults keep the old meaning: one run, a number of the metrics block
    old = _spec(tmp_path, "columns: [{key: acc, label: Acc, metric: clean_acc}]\nrows: [{id: a, label: A}]\n")
    assert (old.columns[0].aggregate, old.columns[0].block, old.columns[0].reduce) == (
        "single", "metrics", None)
    cases = {
        # a statistic over runs needs runs
        "columns: [{key: q, label: Q, metric: clean_acc, aggregate: median}]\nrows: [{id: a, label: A}]\n":
            "at least two runs",
        # a per-epoch list needs a reduction, and a metric needs none
        "columns: [{key: t, label: T, metric: sec_per_epoch, block: timing}]\nrows: [{id: a, label: A}]\n":
            "reduce",
        "columns: [{key: t, label: T, metric: clean_acc, reduce: mean}]\nrows: [{id: a, label: A}]\n":
            "timing and history blocks only",
        "columns: [{key: t, label: T, metric: clean_acc, aggregate: average}]\nrows: [{id: a, label: A}]\n":
            "aggregate",
    }
    for body, expected in cases.items():
        with pytest.raises(SpecError) as info:
            _spec(tmp_path, body)
        assert expected in str(info.value), (body, str(info.value))
    # a row's own seeds count
    spec = _spec(tmp_path, "columns: [{key: q, label: Q, metric: clean_acc, aggregate: q1}]\n"
                           "rows: [{id: a, label: A, seeds: [0, 1]}]\n")
    assert spec.columns[0].aggregate == "q1"


def test_schema_family_counts_as_runs(tmp_path):
    from experiments import SpecError
    spec = _spec(tmp_path, "columns: [{key: b, label: B, metric: clean_acc, aggregate: best}]\n"
                           "rows: [{id: a, label: A, family: [small, medium]}]\n")
    assert spec.rows[0].family == ["small", "medium"]
    with pytest.raises(SpecError, match="must not repeat"):
        _spec(tmp_path, "columns: [{key: b, label: B, metric: clean_acc}]\n"
                        "rows: [{id: a, label: A, family: [small, small]}]\n")


def test_003_table2_is_a_family_best_median_worst():
    spec = load_spec("crown003/table2")
    assert [c.aggregate for c in spec.columns] == ["best", "median", "worst"] * 2
    for row in spec.rows:
        assert row.family is not None and len(row.family) == 8


def test_seed_tables_run_their_seeds():
    assert load_spec("locallip/table4").seeds == [0, 1, 2]
    assert load_spec("crown003/table4").seeds == [0, 1, 2, 3, 4]
    assert load_spec("locallip/table4").row("cifar10-6c2f").reported["certified_std"].value == 0.60


def test_near_finds_the_row_label_by_the_number():
    text = "MNIST 4C3F CAP 88.39 62.25\n" + "x" * 2000 + "\nCIFAR-10 LMT 56.49"
    assert near(88.39, "MNIST 4C3F CAP", text, before=100)
    assert not near(56.49, "MNIST 4C3F CAP", text, before=100)
    assert near(56.49, "CIFAR-10 4C3F LMT", text, before=100)

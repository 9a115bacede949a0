"""Planning table jobs: rows whose model or family certrepro does not have are left out and
named, never faked, and a job with no runnable row is refused with the reasons."""
import pytest

import experiments
from orchestrator.jobs import JobRequestError, plan_table


def test_rows_with_undefined_models_are_left_out_with_the_reason():
    spec = experiments.load_spec("crown003/table4")
    undefined = [row.id for row in spec.rows if row.config.get("model", "").startswith("cibp_")]
    assert undefined
    with pytest.raises(JobRequestError) as error:
        plan_table("crown003/table4", undefined[:2], "paper", None)
    assert "no selected row can run yet" in str(error.value)
    assert "is not defined" in str(error.value)


def test_family_rows_are_left_out_until_families_run():
    spec = experiments.load_spec("crown003/table2")
    family_rows = [row.id for row in spec.rows if row.family]
    assert family_rows
    with pytest.raises(JobRequestError) as error:
        plan_table("crown003/table2", family_rows[:1], "paper", None)
    assert "family" in str(error.value)


def test_runnable_rows_are_planned_beside_left_out_ones():
    plan = plan_table("ibp/table4", None, "quick", [0])
    assert plan.rows and all(row.config["method"] in ("nominal", "pgd", "ibp", "cap")
                             for row in plan.rows)
    assert all(item["reason"] for item in plan.not_implemented)

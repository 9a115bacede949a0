"""Search spaces, schedulers, trial records and the best trial of a sweep, without Ray running."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.sweep_space import (SpaceError, apply_sample, build_scheduler, flat_sample,
                                      grid_size, parse_scheduler, parse_space, tune_space)
from orchestrator.sweep_state import best_trial, trial_record, unflatten


def test_space_is_normalized_and_counted():
    dims = parse_space({"optimizer.lr": {"loguniform": {"low": 1e-4, "high": 1e-2}},
                        "eps_train": {"grid": [0.1, 0.2, 0.3]},
                        "a|b": {"grid": [[1, 2], [3, 4]]},
                        "batch_size": {"randint": [16, 65]}})
    assert [d.to_json() for d in dims][0] == {"loguniform": {"low": 1e-4, "high": 1e-2}}
    assert grid_size(dims) == 6
    space = tune_space({d.key: d.to_json() for d in dims})
    assert space["eps_train"] == {"grid_search": [0.1, 0.2, 0.3]}
    assert space["batch_size"].lower == 16 and space["batch_size"].upper == 65


@pytest.mark.parametrize("space, message", [
    ({"x": {"choice": []}}, "empty"),
    ({"x": {"uniform": [2, 1]}}, "low (2) is greater than high (1)"),
    ({"x": {"randint": [1.5, 3]}}, "low must be an integer"),
    ({"x": {"randint": [3, 3]}}, "must be less than high"),
    ({"x": {"uniform": [0, 1], "grid": [1]}}, "exactly one sampler"),
    ({"x": {"uniform": {"low": 0}}}, "needs both low and high"),
    ({"x|x": {"grid": [[1, 1]]}}, "not repeat"),
    ({"a|b": {"grid": [[1, 2, 3]]}}, "a list of 2 values"),
    ({"a": {"grid": [1]}, "a|b": {"grid": [[1, 2]]}}, "more than one dimension: a"),
    ([], "non-empty mapping"),
])
def test_bad_spaces_name_the_problem(space, message):
    with pytest.raises(SpaceError) as error:
        parse_space(space)
    assert message in str(error.value)


def test_apply_sample_sets_nested_fields_and_joint_dimensions():
    base = {"optimizer": {"lr": 1e-3, "name": "adam"}, "eps": 0.1}
    config = apply_sample(base, {"optimizer.lr": 0.01, "method_options.k|eps_train": [0.5, 0.2]})
    assert config == {"optimizer": {"lr": 0.01, "name": "adam"}, "eps": 0.1,
                      "method_options": {"k": 0.5}, "eps_train": 0.2}
    assert base["optimizer"]["lr"] == 1e-3  # not modified
    assert flat_sample({"a|b": [1, 2], "c": 3}) == {"a": 1, "b": 2, "c": 3}
    with pytest.raises(ValueError, match="eps is 0.1, not a mapping"):
        apply_sample(base, {"eps.low": 1})


def test_schedulers():
    assert parse_scheduler(None, 5) == {"name": "none"}
    asha = parse_scheduler({"name": "asha"}, 5)
    assert asha == {"name": "asha", "max_t": 5, "grace_period": 1, "reduction_factor": 2.0}
    scheduler = build_scheduler(asha)
    assert type(scheduler).__name__ == "AsyncHyperBandScheduler"
    assert build_scheduler({"name": "none"}) is None
    with pytest.raises(SpaceError, match="unknown arguments \\['brackets'\\]"):
        parse_scheduler({"name": "asha", "brackets": 2}, 5)


def trial(trial_id, status, result, config=None):
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=result,
                           config=config or {"optimizer.lr": 0.1}, error_file=None,
                           get_error=lambda: ValueError("data set 'mnist' not found"),
                           num_failures=2)


def test_trial_records_and_best_trial():
    done = trial_record(trial("t0", "TERMINATED", {"final": 1, "metrics": {"m": 0.5},
                                                   "epochs": 3, "mlflow_run_id": "r0"}))
    stopped = trial_record(trial("t1", "TERMINATED", {"epoch": 1, "metrics": {"m": 0.9}}))
    running = trial_record(trial("t2", "RUNNING", {"epoch": 2, "metrics": {"m": 0.7}}))
    failed = trial_record(trial("t3", "ERROR", {}))
    assert (done["status"], done["final"], done["epoch"]) == ("succeeded", True, 3)
    assert (stopped["status"], stopped["stopped_early"]) == ("stopped", True)
    assert running["status"] == "running" and failed["status"] == "failed"
    assert failed["error"] == "failed 2 time(s); last: ValueError: data set 'mnist' not found"
    # certified trials win over higher per-epoch values of unfinished or stopped ones
    assert best_trial([done, stopped, running], "m", "max")["trial_id"] == "t0"
    assert best_trial([stopped, running], "m", "max")["trial_id"] == "t1"  # best so far
    assert best_trial([stopped, running], "m", "min")["trial_id"] == "t2"
    assert best_trial([failed], "m", "max") is None


def test_unflatten():
    assert unflatten({"clean_acc": 1, "verified_acc.ibp": 0.5, "verified_acc.crown": 0.4}) == {
        "clean_acc": 1, "verified_acc": {"ibp": 0.5, "crown": 0.4}}

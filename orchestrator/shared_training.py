"""Rows of one job that would train the identical model share one training.

The figure specs (IBP Figure 3, BCP Figure 4) certify each trained model at several eps: as
plain rows, each would train its own copy. Here the rows of a job are grouped by their training
key (the resolved run config without the fields that only the certification reads); the first
row of a group (lowest index) trains and certifies as any row does, and the others wait for it
to succeed and then only certify its final checkpoint with their own certification settings.

The grouping is decided once, when the job is planned, and stored with the rows (`trained_by`),
so a restarted service, a retry or another dispatcher sees the same groups.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from workers.core.config import RunConfig, resolve

# Fields that only the certification after training reads (workers/runner.py `certify_model`;
# `workers/core/train.py` never reads them). Two rows that differ only here train the same model.
CERTIFY_ONLY = (
    "eps",                 # the certified radius; training reads eps_train, resolved first (a
                           # row that leaves eps_train unset trains at its eps: not merged)
    "certifiers",          # which verifiers run after training
    "attack",              # the PGD attack of the empirical column (training attacks are
                           # method_options of pgd / trades)
    "test_limit",          # how many test examples are certified
    "certify_batch_size",  # the certification's batch size (memory, not results)
)
# Where a row runs and reads its files, not what it trains (config_hash leaves them out too):
# the executor sets `device` per cluster, and `data_root` names where the same data set lies.
# A certify-only row keeps its own values of these.
PLACEMENT = ("device", "data_root")


def training_key(config: RunConfig | dict[str, Any]) -> str:
    """sha256 of the resolved config without CERTIFY_ONLY and PLACEMENT: equal keys train the
    identical model (the seed is part of the key: same seed only)."""
    data = resolve(config).model_dump(exclude=set(CERTIFY_ONLY) | set(PLACEMENT))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def assign_trainers(configs: list[dict[str, Any]]) -> list[int | None]:
    """For each config, the index of the earlier config that trains its model, or None when it
    trains itself (the first of its group, or alone)."""
    first: dict[str, int] = {}
    trainers: list[int | None] = []
    for index, config in enumerate(configs):
        key = training_key(config)
        trainers.append(first.get(key))
        first.setdefault(key, index)
    return trainers


def certification_overrides(config: RunConfig | dict[str, Any]) -> dict[str, Any]:
    """What a certify-only row sets over the trainer's config: its certification settings and
    its placement. With the training key equal, the result is the row's own config."""
    dumped = resolve(config).model_dump()
    return {name: dumped[name] for name in CERTIFY_ONLY + PLACEMENT}


def shared_training_tags(source: dict[str, Any]) -> dict[str, str]:
    """MLflow tags of a certify-only row's run: the row and the run that trained its model."""
    return {"certrepro.trained_by_row": str(source["row"]),
            "certrepro.trained_by_row_id": str(source["row_id"]),
            "certrepro.trained_by_run": str(source.get("mlflow_run_id") or "")}

"""Figures of Lipschitz-bound training (registered in orchestrator.figures.FIGURES): the global
and local Lipschitz bounds during training (Local-Lip Figure 2) and the share of varying ReLUs per
layer (Local-Lip Figure 3)."""
from __future__ import annotations

from .figures import FIGURES  # noqa: F401  (the registry these figures join)

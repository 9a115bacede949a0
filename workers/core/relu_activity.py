"""The share of varying (non-constant) ReLU outputs per layer over a perturbation set (Local-Lip
Figure 3), measured on a trained network and recorded during training."""
from __future__ import annotations

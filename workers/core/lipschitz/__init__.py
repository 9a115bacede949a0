"""Lipschitz-based bounds for l_2 (and, through the circumscribing ball, l_inf) certificates:
power iteration for layer norms (`power`), the network read as affine stages (`network`), BCP's
ball-and-box propagation and its problem-(11) solver (`bcp`), the global / local norm providers
(`norms`), Local-Lip's per-example iterate store (`store`), whole-network bounds (`bounds`) and the
varying-output masks and their shares per layer (`varying`)."""
from .bcp import Outer, margin_lower, propagate, solve_ball_box, tightness, worst_logits
from .bounds import (bcp_margins, bcp_outer, bcp_tightness, global_bound, lipschitz_margins,
                     local_bound, local_margins, local_outer)
from .network import Affine, Network, input_radius, network_of
from .norms import (CertifiedGlobalNorms, CertifiedLocalNorms, SharedStartLocalNorms,
                    TrainingGlobalNorms, TrainingLocalNorms)
from .power import CertifySettings, GlobalPower, certified_norms, power_iterate, safety_factor
from .store import IterateStore
from .varying import layer_shares, share_stats, varying_masks

__all__ = [
    "Outer", "margin_lower", "propagate", "solve_ball_box", "tightness", "worst_logits",
    "bcp_margins", "bcp_outer", "bcp_tightness", "global_bound", "lipschitz_margins",
    "local_bound", "local_margins", "local_outer", "Affine", "Network", "input_radius",
    "network_of", "CertifiedGlobalNorms", "CertifiedLocalNorms", "IterateStore",
    "SharedStartLocalNorms", "TrainingGlobalNorms", "TrainingLocalNorms", "CertifySettings",
    "GlobalPower", "certified_norms", "power_iterate", "safety_factor", "layer_shares",
    "share_stats", "varying_masks",
]

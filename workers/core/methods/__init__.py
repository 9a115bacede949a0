"""Training methods, registered by name in METHODS. Importing this package registers the built-in
ones; later methods register the same way from their own modules."""
from . import cap, crown_ibp, ibp, regularized, standard  # noqa: F401  (registration)
from . import bcp, gloro, lmt, local_lip  # noqa: F401  (Lipschitz methods)
from . import trades  # noqa: F401  (TRADES, Zhang et al. 2019)
from .base import METHODS, Method, NoOptions, StepState

__all__ = ["METHODS", "Method", "NoOptions", "StepState"]

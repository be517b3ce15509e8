"""The module layout of satlm 0.1, kept for its callers: SATAttention is modeling/attention.py, SATMLP
modeling/mlp.py, the shared wrapper machinery modeling/base.py, the runtime modeling/runtime.py."""

from __future__ import annotations

from .attention import SATAttention  # noqa: F401
from .base import BASE_PREFIX, _SATModule  # noqa: F401
from .mlp import SATMLP  # noqa: F401
from .runtime import SATRuntime  # noqa: F401

"""PyTorch-side helpers shared by the bridge modules (``functional``, ``roi``)."""
from __future__ import annotations

import torch

# The tensor dtypes the operators are defined for.
SUPPORTED_DTYPES = (torch.float32, torch.float64)

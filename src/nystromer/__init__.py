"""nystromer: fast, padding- and batch-correct Nyström attention for PyTorch.

Public API:
    nystrom_attention   the attention function (shapes like scaled_dot_product_attention)
    NystromAttention    a batch-first multi-head attention module
"""

from .attention import NystromAttention
from .functional import iterative_pinv, nystrom_attention

__version__ = "0.1.0"

__all__ = ["NystromAttention", "iterative_pinv", "nystrom_attention", "__version__"]

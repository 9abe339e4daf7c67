"""Longhorn: online-regression state update with a diagonal (elementwise) closed form."""

from kernels.longhorn.naive import naive_recurrent_longhorn
from kernels.longhorn.ops import longhorn

__all__ = ["longhorn", "naive_recurrent_longhorn"]

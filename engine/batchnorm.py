"""The old path ``clipdistill.engine.batchnorm``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.parallel.batchnorm`` instead.
The module was: Batch norm whose statistics come from the real rows of a batch, on one rank or all of them.
"""
from clipdistill.engine.parallel.batchnorm import RowBatchNorm2d, synchronize

__all__ = ["RowBatchNorm2d", "synchronize"]

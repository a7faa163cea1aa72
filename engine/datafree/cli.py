"""The old path ``clipdistill.engine.datafree.cli``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.commands.datafree`` instead.
The module was: The data-free commands: ``synthesize``, ``datafree-report``, ``distill-datafree``, ``datafree-eval``.
"""
from clipdistill.engine.commands.datafree import (DIVERSIFIERS, GENERATORS, register, run_distill, run_eval,
                                                  run_report, run_synthesize)

__all__ = ["DIVERSIFIERS", "GENERATORS", "register", "run_distill", "run_eval", "run_report", "run_synthesize"]

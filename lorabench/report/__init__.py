"""Reports of sweeps: reconcile predicted, traced and measured memory into tables, figures and decisions.

* :mod:`lorabench.report.frame`: derived per-run columns (levels, errors, units); pandas.
* :mod:`lorabench.report.tables`: markdown tables (tabulate).
* :mod:`lorabench.report.plots`: PNG figures (matplotlib, Agg).
* :mod:`lorabench.report.decide`: decision tables from the planner (torch-free, pandas-free; also used by
  ``lorabench compare``).
* :mod:`lorabench.report.build`: writes ``reports/<sweep>/README.md`` (``lorabench report``).

This package's ``__init__`` imports nothing heavy, so ``lorabench.report.decide`` stays cheap to import.
"""

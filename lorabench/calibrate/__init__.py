"""Fit the planner's device overheads on half of the GPU runs, score the other half (``lorabench calibrate``).

:mod:`lorabench.calibrate.fit` holds the model, the split, the fit and :func:`check` (which the CI guard,
tests/test_gpu_records.py, runs on the committed records); :mod:`lorabench.calibrate.write` the YAML and report.
"""

from lorabench.calibrate.fit import (DEFAULT_RECORDS, MEASURED_KEYS, MIN_FIT_RUNS, SPLIT_SALT,  # noqa: F401
                                     TARGET_MAX_ABS_REL_ERR, TARGET_MEDIAN_ABS_REL_ERR, Calibration, Check, Refusal,
                                     RunError, VerdictCheck, allocated_residuals, check, fit, half,
                                     is_measured_gpu_run, is_probe, l1_floor, label, load_records,
                                     measured_device_bytes, predicted_levels, run_error, specs_of, verdict)
from lorabench.calibrate.write import calibrate, calibration_doc, provenance, report_lines, write_yaml  # noqa: F401

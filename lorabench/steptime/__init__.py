"""The torch-free step-time model: a roofline per op class, summed (see :mod:`lorabench.steptime.model`).

Named ``steptime`` (not ``time``) so it never shadows the standard library's :mod:`time`.
"""

"""lorabench's torch runtime: model building, method application, tracing, measurement.

Nothing here is imported by the torch-free core (``plan``/``report``); import the submodules explicitly
(``lorabench.runtime.build``, ``lorabench.runtime.tracker``...).
"""

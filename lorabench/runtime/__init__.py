"""lorabench's torch runtime: model building, method application, tracing, measurement.

Nothing here is imported by the torch-free core (``plan``/``report``); import the submodules explicitly
(``lorabench.runtime.build``, ``lorabench.runtime.tracker``...).
"""

import logging as _logging

# bitsandbytes' CPU backend logs a warning at import when the optional `kernels` package is absent; lorabench
# never needs it (and must not install it: it downloads from a hub), so keep that logger quiet for every job.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

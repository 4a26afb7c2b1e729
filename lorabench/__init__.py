"""lorabench: plan, trace and measure the memory of LLM fine-tuning.

The torch-free core (``specs``, ``catalog``, ``memory``, ``methods.*.config``/``memory``, ``records``,
``report``) never imports torch; the runtime layer (``quant``, ``runtime``, ``methods.*.layer``) does.
"""

__version__ = "0.1.0"

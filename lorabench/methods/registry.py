"""The explicit method registry (torch-free): one :class:`Method` object per method, registered by its
folder's ``__init__`` (``METHOD = register(Method(...))``). Nothing here imports a method by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lorabench.errors import suggest
from lorabench.methods.base import MethodConfig
from lorabench.methods.protocols import Estimator, MethodRuntime, StepTimeTerms


@dataclass(frozen=True)
class Method:
    """Everything the core and the runtime know about one method.

    Attributes:
        config: the frozen config dataclass; ``config.name`` is the method's name everywhere.
        estimator: the torch-free planner terms (the folder's ``memory`` module).
        load_runtime: returns the folder's runtime module (imports torch; called by the runtime only).
        default_precision: the precision a run uses when none is given (full fine-tuning keeps fp32
            master weights under bf16 autocast; PEFT methods train on a bf16 model).
        sources_anchor: the docs/SOURCES.md anchor of the method's trainable-parameter formula ("" when
            every parameter trains).
        step_time: the torch-free step-time terms (the folder's ``steptime`` module).
    """

    config: type[MethodConfig]
    estimator: Estimator
    load_runtime: Callable[[], MethodRuntime]
    default_precision: str = "bf16"
    sources_anchor: str = ""
    step_time: StepTimeTerms | None = None

    @property
    def name(self) -> str:
        return self.config.name


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` (once; a second registration of the same name is a programming error)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise RuntimeError(f"method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def registered() -> dict[str, Method]:
    """Name -> Method, in registration order."""
    return dict(_REGISTRY)


def get(name: str) -> Method:
    """The registered method called ``name``.

    Raises:
        UserError: no such method (with the closest name as the fix).
    """
    if name not in _REGISTRY:
        raise suggest(name, tuple(_REGISTRY), "method")
    return _REGISTRY[name]

"""CLI flags generated from frozen dataclasses and their attribute docstrings (torch-free).

A knob is a dataclass field; its ``--help`` text is the string literal right below the field (an
attribute docstring, read from the class source with :mod:`ast`). ``plan``, ``compare``, ``trace`` and
``advise`` get their method flags from the method configs and their training flags from
:class:`~lorabench.specs.TrainSpec`, so a new knob is one field (plus its line in ``conf/``, which a test
checks).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of ``cls`` and its dataclass bases (a subclass's own docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (frozen app): flags still work, without help text
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@dataclass(frozen=True)
class Knob:
    """One field as a flag: its parser, its default per owner, its help text."""

    name: str
    parse: Callable[[str], Any] | None
    """None for a boolean (a switch)."""
    defaults: dict[str, Any]
    """owner (method name, or '' for one class) -> the field's default."""
    doc: str
    flags: tuple[str, ...]

    @property
    def switch_default(self) -> bool:
        return bool(next(iter(self.defaults.values())))


def _parser(hint: Any) -> Callable[[str], Any] | None:
    """bool -> None (a switch); int/float/str -> that type; unions take their first scalar member."""
    members = typing.get_args(hint) or (hint,)
    for kind in (bool, int, float, str):
        if kind in members:
            return None if kind is bool else kind
    return str


def _default(f: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def knobs(owners: Mapping[str, type], skip: Iterable[str] = ()) -> list[Knob]:
    """One Knob per field name over ``owners`` (name -> dataclass), in first-seen order.

    A class may rename or alias a flag with ``FLAG_ALIASES: ClassVar[dict[str, tuple[str, ...]]]``
    (field -> flags, the first being the main one). A boolean that defaults to True becomes ``--no-<name>``.
    """
    found: dict[str, Knob] = {}
    for owner, cls in owners.items():
        hints = typing.get_type_hints(cls)
        aliases = getattr(cls, "FLAG_ALIASES", {})
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            default = _default(f)
            if f.name in found:
                found[f.name].defaults[owner] = default
                continue
            parse = _parser(hints[f.name])
            dashed = f.name.replace("_", "-")
            main = f"--no-{dashed}" if parse is None and default is True else f"--{dashed}"
            flags = tuple(aliases.get(f.name, ())) or (main,)
            if main not in flags:
                flags = flags + (main,)
            found[f.name] = Knob(f.name, parse, {owner: default}, field_docs(cls).get(f.name, ""), flags)
    return list(found.values())


def add_knobs(group: Any, knobs_: Iterable[Knob], *, keep_defaults: bool = False,
              help_suffix: Callable[[Knob], str] | None = None,
              choices: Mapping[str, Iterable[str]] | None = None) -> None:
    """Add one argparse option per knob to ``group``.

    Args:
        keep_defaults: the namespace holds the field's default when the flag is absent (else None, meaning
            'the owner's default', resolved later).
        help_suffix: extra text after the docstring (e.g. the defaults per method).
        choices: field -> allowed values (checked by argparse, shown in ``--help``).
    """
    for k in knobs_:
        text = k.doc + (help_suffix(k) if help_suffix else "")
        default = next(iter(k.defaults.values())) if keep_defaults else None
        kw: dict[str, Any] = {"dest": k.name, "help": text.replace("%", "%%"), "default": default}
        if k.parse is None:
            kw["action"] = "store_false" if k.switch_default else "store_true"
            if not keep_defaults:
                kw["default"] = None
        else:
            kw["type"] = k.parse
            if choices and k.name in choices:
                kw["choices"] = tuple(choices[k.name])
                kw["metavar"] = k.name.upper()
        group.add_argument(*k.flags, **kw)


def values(args: argparse.Namespace, knobs_: Iterable[Knob]) -> dict[str, Any]:
    """The knobs the namespace holds (None = not given)."""
    return {k.name: getattr(args, k.name) for k in knobs_ if getattr(args, k.name, None) is not None}

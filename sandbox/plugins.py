"""Extension points: kinds registered by name, looked up from a flag's value.

A value names a kind in one of three ways, tried in this order:

1. a built-in name (``softmax``, ``sigmoid`` for routers): registered here by the module that
   defines them (`register`), through the same table as everything else;
2. a name in the extension point's Python entry point group (``molora.routers``), declared by an
   installed distribution::

       [project.entry-points."molora.routers"]
       topk = "my_package.routers:TopKSoftmax"

3. ``module:Name``: any importable object (``examples.topk_router:TopKSoftmax``), no install needed
   (the current folder is searched too, as ``python -m`` does).

A class is instantiated with no arguments; anything else is used as it is. The object is checked
against its extension point's protocol once, when first resolved (`Group.checker`), so a plugin
that breaks the protocol fails before a run starts, with one line naming the method and the
expected shape (`PluginError`, a `BadInput`: exit 2 on the command line). Resolved kinds are
cached per value. The values themselves are what configs store, so a run folder records which
plugin it ran.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable

from sandbox.errors import BadInput


class PluginError(BadInput):
    """A plugin that breaks its protocol: ``error: --router 'mod:Name': Name.gates() returned shape
    (2, 5, 3); expected (*b, N, K) = (2, 5, 4)`` (one line, exit 2 on the command line)."""

    def __init__(self, flag: str, value: Any, problem: str):
        self.flag, self.value, self.allowed = flag, value, problem
        ValueError.__init__(self, f"{flag} {value!r}: {problem}")


@dataclass
class Group:
    """One extension point.

    Attributes:
        what: its name in messages (``router``).
        flag: the flag that names a kind (``--router``).
        entry_points: the Python entry point group (``molora.routers``).
        checker: ``checker(obj, value)`` raises `PluginError` when ``obj`` breaks the protocol.
    """

    what: str
    flag: str
    entry_points: str
    checker: Callable[[Any, str], None] | None = None
    builtin: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Built-in and installed names (not the ``module:Name`` values, which are open)."""
        return [*self.builtin, *(e.name for e in entry_points(group=self.entry_points) if e.name not in self.builtin)]

    def allowed(self) -> str:
        return (f"one of {', '.join(self.names())}, a name in the entry point group {self.entry_points}, "
                f"or module:Name of a {self.what} plugin (docs/plugins.md)")


GROUPS: dict[str, Group] = {}


def group(key: str, what: str, flag: str, entry_point_group: str, checker=None) -> Group:
    """Declare an extension point (once, by the module that owns its protocol)."""
    g = GROUPS.setdefault(key, Group(what, flag, entry_point_group))
    g.checker = checker if checker is not None else g.checker
    return g


def register(key: str, name: str, obj: Any) -> None:
    """Register a built-in kind under `name` (no protocol check: the package's own kinds are tested)."""
    GROUPS[key].builtin[name] = obj


def is_builtin(key: str, value: str) -> bool:
    return value in GROUPS[key].builtin


def resolve(key: str, value: str, flag: str | None = None) -> Any:
    """The kind `value` names in extension point `key`; `BadInput` naming `flag` if none, or
    `PluginError` if the object breaks the protocol."""
    g = GROUPS[key]
    flag = flag or g.flag
    if not isinstance(value, str) or not value:
        raise BadInput(flag, value, g.allowed())
    if value in g.builtin:
        return g.builtin[value]
    if value in g.cache:
        return g.cache[value]
    obj = _load(g, value, flag)
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as e:   # a plugin's own constructor: say so in one line
            raise PluginError(flag, value, f"{obj.__name__}() raised {type(e).__name__}: {e}; expected a class "
                              "that takes no arguments, or an instance") from None
    g.cache[value] = obj          # before the check: the probe builds configs that name `value` too
    if g.checker is not None:
        try:
            g.checker(obj, value)
        except PluginError:
            del g.cache[value]
            raise
        except Exception as e:    # the plugin's own code raised during the probe: one line, not a traceback
            del g.cache[value]
            raise PluginError(flag, value, f"{type(obj).__name__} raised {type(e).__name__} when probed on small "
                              f"shapes: {e}; expected the {g.what} protocol (docs/plugins.md)") from None
    return obj


def _load(g: Group, value: str, flag: str) -> Any:
    if ":" in value:
        mod, _, attr = value.partition(":")
        if os.getcwd() not in sys.path and "" not in sys.path:   # as `python -m` does: the console script
            sys.path.append(os.getcwd())                         # finds modules of the folder it runs in
        try:
            module = importlib.import_module(mod)
        except ImportError as e:
            raise BadInput(flag, value, f"module:Name with an importable module ({e}); {g.allowed()}") from None
        obj = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise BadInput(flag, value, f"module:Name, and {mod} has no {attr!r}; {g.allowed()}")
            obj = getattr(obj, part)
        return obj
    found = [e for e in entry_points(group=g.entry_points) if e.name == value]
    if not found:
        raise BadInput(flag, value, g.allowed())
    try:
        return found[0].load()
    except Exception as e:
        raise PluginError(flag, value, f"entry point {found[0].value} did not load ({type(e).__name__}: {e})") from None

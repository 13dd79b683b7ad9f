"""One identity for every config: which of its fields name a run folder, a ledger point, a study or a
cache entry, and the rule that keeps each name the same as fields are added.

A run resumes, a ledger reuses its trials and a cache hits only while the hash that names them stays
the same. Every option added since the first folders were written would change that hash unless it is
left out at the value those runs had. Each such rule is declared once, on the field it concerns, as
dataclass field metadata (`rules`):

``never(why)``
    never part of the identity (the device, the seeds, the statistics settings).
``later(why, value=<the field's default>)``
    left out at `value`: added after the first keys were written, at the value those keys had.
``unless(flag, why)``
    left out unless the field `flag` of the same config is on (the acar arm's tolerance).
``same_as(other, why)``
    left out when its value equals field `other`'s (a router learning rate equal to ``lr`` is the
    single learning rate of earlier runs).
``resolved(attr, why, name=None)``
    enters as ``getattr(cfg, attr)`` (a property resolving a None default), under `name` when given;
    the other rules see the resolved value.
``flat(names, why)``
    a nested config enters as flat entries, ``{flat name: field of the nested config}``, after the
    nested config's own rules (the cell's router and lifecycle under its flag names).

A rule may hold in some *views* only (``views=``): one config names several things. The views:

- ``run`` (the default): a run's or a point's identity (a cell's checkpoints and folder, the analytic
  map's ledger points, a fusion trial);
- ``template``: the settings a factorial's trials share (its study name: no cell, no seed);
- ``map-point`` / ``map-folder``: the transformer map's ledger point (the cell under its flat names,
  without seed and device) and its default folder (the cell nested, as the map first wrote it);
- ``base``: the fields that shape a pretrained base (the pretraining cache key).

`identity(cfg, view)` applies the rules recursively (a nested config follows its own fields' rules)
and `key(obj, n, view)` hashes the identity of `obj` (a config, or a dict or list holding configs):
the first `n` hex digits of the SHA-256 of its sorted JSON (`sandbox.results.config_hash`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from sandbox.results.jsonable import config_hash

#: The field metadata key that holds a field's rules.
RULES = "identity"
#: The view of a plain `identity(cfg)`.
RUN = "run"
#: The views a rule may name (`Rule.views`).
VIEWS = (RUN, "template", "map-point", "map-folder", "base")
#: A run and the template of a factorial's runs: the cell's run-level rules hold in both.
RUNS = (RUN, "template")
#: The transformer map's point and folder.
MAPS = ("map-point", "map-folder")
KINDS = ("never", "later", "unless", "same_as", "resolved", "flat")
_DEFAULT = object()   # `later`'s value: the field's own default


@dataclass(frozen=True)
class Rule:
    """One compatibility rule of one field (see the module docstring for the kinds)."""

    kind: str
    why: str
    value: Any = None
    """later: the value left out; unless / same_as: the other field; resolved: the attribute; flat:
    ``{flat name: nested field}``."""
    name: str | None = None
    """resolved: the entry's name (default: the field's)."""
    views: tuple[str, ...] | None = None
    """The views the rule holds in (None: every view)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"identity rule kind {self.kind!r}: one of {', '.join(KINDS)}")
        if self.views is not None and not set(self.views) <= set(VIEWS):
            raise ValueError(f"identity rule views {self.views!r}: among {', '.join(VIEWS)}")
        if not self.why:
            raise ValueError("an identity rule says why it exists")

    def holds(self, view: str) -> bool:
        return self.views is None or view in self.views


def _views(views) -> tuple[str, ...] | None:
    return None if views is None else (views,) if isinstance(views, str) else tuple(views)


def never(why: str, *, views=None) -> Rule:
    """Never part of the identity (in `views`)."""
    return Rule("never", why, views=_views(views))


def later(why: str, value: Any = _DEFAULT, *, views=None) -> Rule:
    """Left out at `value` (default: the field's default): added after the first keys were written."""
    return Rule("later", why, value, views=_views(views))


def unless(flag: str, why: str, *, views=None) -> Rule:
    """Left out unless field `flag` of the same config is on."""
    return Rule("unless", why, flag, views=_views(views))


def same_as(other: str, why: str, *, views=None) -> Rule:
    """Left out when equal to field `other`'s entered value."""
    return Rule("same_as", why, other, views=_views(views))


def resolved(attr: str, why: str, *, name: str | None = None, views=None) -> Rule:
    """Enters as ``getattr(cfg, attr)``, under `name` when given."""
    return Rule("resolved", why, attr, name=name, views=_views(views))


def flat(names: Mapping[str, str], why: str, *, views=None) -> Rule:
    """A nested config enters as ``{flat name: its field}`` entries, after its own rules."""
    return Rule("flat", why, dict(names), views=_views(views))


def rules(*declared: Rule) -> dict:
    """Field metadata holding `declared`: ``field(default=..., metadata=rules(later("...")))``."""
    return {RULES: tuple(declared)}


def field_rules(cls_or_cfg) -> dict[str, tuple[Rule, ...]]:
    """``{field: rules}`` of a config class (fields without rules left out): what a reader or a test
    lists to see every compatibility rule of a class."""
    return {f.name: f.metadata[RULES] for f in dataclasses.fields(cls_or_cfg) if f.metadata.get(RULES)}


def identity(cfg: Any, view: str = RUN) -> dict:
    """The identity of the config `cfg` in `view`: ``{name: value}`` of its fields after their rules,
    nested configs by their own identity (same view)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"identity of a config instance, not {type(cfg).__name__}")
    if view not in VIEWS:
        raise ValueError(f"identity view {view!r}: one of {', '.join(VIEWS)}")
    out: dict[str, Any] = {}
    omissions: list[tuple[str, Rule, Any]] = []
    for f in dataclasses.fields(cfg):
        held = [r for r in f.metadata.get(RULES, ()) if r.holds(view)]
        if any(r.kind == "never" for r in held):
            continue
        value = getattr(cfg, f.name)
        spread = [r for r in held if r.kind == "flat"]
        if spread:
            inner = identity(value, view)
            out.update({outer: inner[name] for outer, name in spread[0].value.items() if name in inner})
            continue
        name = f.name
        for r in held:
            if r.kind == "resolved":
                name, value = r.name or f.name, getattr(cfg, r.value)
        out[name] = tree(value, view)
        omissions.extend((name, r, f.default) for r in held if r.kind in ("later", "unless", "same_as"))
    entered = dict(out)
    for name, r, default in omissions:
        v = entered[name]
        if r.kind == "later":
            left_out = v == (default if r.value is _DEFAULT else r.value)
        elif r.kind == "unless":
            left_out = not getattr(cfg, r.value)
        else:
            left_out = r.value in entered and v == entered[r.value]
        if left_out:
            out.pop(name, None)
    return out


def tree(obj: Any, view: str = RUN) -> Any:
    """`obj` with every config in it (at any depth of dicts, lists and tuples) replaced by its identity."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return identity(obj, view)
    if isinstance(obj, dict):
        return {k: tree(v, view) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tree(v, view) for v in obj]
    if isinstance(obj, tuple):
        return tuple(tree(v, view) for v in obj)
    return obj


def key(obj: Any, n: int = 10, view: str = RUN) -> str:
    """The key of `obj` (a config, or a dict or list holding configs): the first `n` hex digits of the
    hash of its identity (`tree`) in `view`."""
    return config_hash(tree(obj, view), n)

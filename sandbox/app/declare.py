"""Command options declared once: built from the config dataclasses' fields.

A setting lives in one place, the dataclass field that holds it: its default, its type and its
docstring (the string literal under the field, or the class docstring's ``Attributes:`` entry).
A command asks for options by field (`from_fields`), adds the few options that are its own
(`own`: seeds, output folder, ...) and `declared` turns the list into the function signature typer
reads (``--n-die`` from field ``n_die``). Each option remembers the field it came from, so what the
command receives is grouped back the same way (`Received`, the inverse of `from_fields`): the
command builds its configs with ``got.build(cls)`` and reads its own options by name, and a reader
(and `tests/test_declare.py`) can follow a flag from the command line to the field where it acts.

A command may leave a field's default to run time (``auto``): its option defaults to ``None`` and
the help says what it resolves to (the step-scaled lifecycle interval, the machine's device).
`Received` leaves such an option out of the config's fields while it is None, so the config's own
default (or the command's run-time rule) decides.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Optional

import typer

from sandbox.errors import flag_for


RUN_PANEL = "Run and output"
#: Config class -> the ``--help`` panel of its options.
PANELS = {"CellConfig": "Cell and substrate", "RouterConfig": "Router", "LifecycleConfig": "Lifecycle",
          "FactorialConfig": "Design and statistics", "SweepConfig": "Grid and statistics",
          "TuneConfig": "Baseline tuning", "TaskSpec": "Task", "AnalyticConfig": "Solvers and arms",
          "RoutingArms": "Solvers and arms", "FusionConfig": "Fusion", "FusionSweepConfig": "Fusion",
          "BenchConfig": "Benchmark"}


@dataclass(frozen=True)
class Opt:
    """One command option.

    Attributes:
        name: the keyword the command receives (a field name, or the command's own).
        default: the option's default (``None`` for an ``auto`` option).
        annotation: the type typer parses the value into.
        decls: typer's parameter declarations, e.g. ``("--n-die",)``.
        help: the help text.
        source: ``(dataclass, field)`` the option comes from, or None for a command's own option.
        auto: the command resolves the default at run time (then ``default`` is None).
        hidden: left out of ``--help`` (test hooks).
        systems: where the option acts on each system of a command that builds a different config
            per system (`sandbox sweep --system`): ``(system, (dataclass, field))`` pairs, set by
            `per_system`; empty for an option that fills `source` alone.
    """

    name: str
    default: Any
    annotation: Any
    decls: tuple[str, ...]
    help: str
    source: tuple[type, str] | None = None
    auto: bool = False
    hidden: bool = False
    systems: tuple[tuple[str, tuple[type, str]], ...] = ()

    def source_for(self, system: str) -> tuple[type, str] | None:
        """``(dataclass, field)`` the option fills on `system`: its declared per-system source, else
        `source`."""
        return dict(self.systems).get(system, self.source)

    @property
    def panel(self) -> str:
        """The help panel (``--help`` groups options by concern): the config the option comes from,
        or "Run and output" for the command's own options (seeds, folders, threads)."""
        return RUN_PANEL if self.source is None else PANELS.get(self.source[0].__name__, "Options")

    def parameter(self) -> inspect.Parameter:
        info = typer.Option(self.default, *self.decls, help=self.help, hidden=self.hidden, rich_help_panel=self.panel)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=self.annotation)


def own(name: str, default: Any, *decls: str, help: str, annotation: Any = None, hidden: bool = False) -> Opt:
    """An option that belongs to the command, not to a config (``--seeds``, ``--out``)."""
    ann = annotation if annotation is not None else (type(default) if default not in (None, ...) else Optional[str])
    return Opt(name, default, ann, decls or (flag_for(name),), help, hidden=hidden)


def per_system(opts: list[Opt], sources: dict[str, dict[str, tuple[type, str]]]) -> list[Opt]:
    """`opts` with `Opt.systems` declared from `sources` (keyword -> {system: (dataclass, field)}): the
    options a command with several systems shares, each followed to the field it fills in each
    system's config. Refused (``ValueError``, a programming error): a keyword that is not an option, a
    field its class does not have, or an analytic-style `source` the declaration contradicts."""
    by_name = {o.name: o for o in opts}
    unknown = sorted(set(sources) - set(by_name))
    if unknown:
        raise ValueError("per-system sources for options not declared: " + ", ".join(unknown))
    for name, where in sources.items():
        for system, (cls, field) in where.items():
            if field not in {f.name for f in dataclasses.fields(cls)}:
                raise ValueError(f"--{name} on {system}: {cls.__name__} has no field {field!r}")
        src = by_name[name].source
        if src is not None and src not in where.values():
            raise ValueError(f"--{name}: its source {src[0].__name__}.{src[1]} is in no system's declaration")
    return [dataclasses.replace(o, systems=tuple(sources[o.name].items())) if o.name in sources else o for o in opts]


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field: doc}`` for a dataclass: the string literal under each field, else the field's entry
    in the class docstring's ``Attributes:`` section. Whitespace is folded, reST quotes dropped."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        docs.update(_attributes_section(klass.__doc__ or ""))
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = nxt.value.value
    return {k: _fold(v) for k, v in docs.items()}


def _attributes_section(doc: str) -> dict[str, str]:
    lines = textwrap.dedent("\n".join(doc.splitlines()[1:])).splitlines()
    out: dict[str, str] = {}
    inside, current, indent = False, None, None
    for line in lines:
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if line.strip() and not line.startswith(" "):
            break                                      # the section ended
        m = re.match(r"^(\s+)(\w+): (.*)$", line)
        if m and (indent is None or len(m.group(1)) == indent):
            indent, current = len(m.group(1)), m.group(2)
            out[current] = m.group(3)
        elif current is not None and line.strip():
            out[current] += " " + line.strip()
    return out


#: Help for fields whose docstring is a design note rather than a sentence for a user (the note
#: stays where it is; the manual carries the rest). Keyed by (class name, field).
USER_HELP = {
    ("RouterConfig", "tau_scales"): "What the sigmoid temperature divides: logit (the whole logit, (h W + b) / tau; "
                                    "a mass start's gates then end on their floors) or input (only h W / tau; the bias "
                                    "keeps the start's operating point through the anneal).",
    ("LifecycleConfig", "interval"): "Steps between lifecycle events (factor L), and between the fitness "
                                     "measurements every cell logs (fitness.csv).",
    ("RouterConfig", "init"): "How the sigmoid router's bias starts: zero (bias 0, total gate weight about K (1 + f) / 2) "
                              "or mass (total gate weight init_mass at step 0, a fair start against the softmax).",
}

_INTERNAL = (
    (re.compile(r"\s*\((?:the class default|None)\b[^()]*(?:\([^()]*\)[^()]*)*\)"), ""),   # (the class default: ...)
    (re.compile(r"\s*\((?:sandbox|substrate|sweeps|figures)\.[\w.]+\)"), ""),             # (sandbox.sequential)
    (re.compile(r"(?<=,)\s*(?:sandbox|substrate|sweeps|figures)\.[a-z_][\w.]*:"), ""),       # , substrate.acar: top-3
    (re.compile(r";\s*None\b.*?(?=;|\.(?:\s|$)|$)"), ""),                                   # ; None leaves it to ...
    (re.compile(r",? or None\b[^.;]*"), ""),                                                  # , or None to draw it ...
)


def user_help(text: str, limit: int = 240) -> str:
    """The part of a field's docstring meant for a user: clauses about None (which the command line
    cannot pass), the class default and module paths dropped, then whole sentences up to `limit`
    characters (at least the first)."""
    for pattern, repl in _INTERNAL:
        text = pattern.sub(repl, text)
    sentences = re.split(r"(?<=\.)\s+(?=[A-Za-z0-9])", text.strip())
    out = sentences[0]
    for s in sentences[1:]:
        if len(out) + 1 + len(s) > limit:
            break
        out += " " + s
    return out


def _fold(text: str) -> str:
    text = " ".join(text.split())
    return re.sub(r"`+([^`]+)`+", r"\1", text)


def _annotation(cls: type, name: str, auto: bool) -> Any:
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        hint = Optional[inner[0]] if len(inner) == 1 else hint
    elif auto:
        hint = Optional[hint]
    return hint


def from_fields(cls: type, names: Iterable[str], *, instance: Any = None, flags: dict[str, str] | None = None,
                auto: dict[str, str] | None = None, rename: dict[str, str] | None = None,
                decls: dict[str, tuple[str, ...]] | None = None) -> list[Opt]:
    """Options for fields ``names`` of dataclass ``cls``.

    Args:
        instance: where the defaults come from (default: ``cls()``); a cell's router, say, has
            other defaults than `RouterConfig`'s class defaults.
        rename: field -> the keyword the command receives (``{"init": "router_init"}``); the flag is
            derived from the keyword unless ``flags`` names it.
        flags: keyword -> flag, where the flag differs from ``--keyword-with-dashes``.
        auto: keyword -> what the run-time default resolves to (the option defaults to None).
        decls: keyword -> full typer declarations (``("--fresh-noise/--fixed-noise",)``).
    """
    inst = cls() if instance is None else instance
    docs = field_docs(cls)
    flags, auto, rename, decls = flags or {}, auto or {}, rename or {}, decls or {}
    known = {f.name for f in dataclasses.fields(cls)}
    opts = []
    for name in names:
        if name not in known:
            raise KeyError(f"{cls.__name__} has no field {name!r}")
        key = rename.get(name, name)
        is_auto = key in auto
        help_text = USER_HELP.get((cls.__name__, name)) or user_help(docs.get(name, ""))
        if re.match(r"^[a-z]{2,} (?!\()", help_text):   # a sentence; "lora (...)", "d: ..." keep their case
            help_text = help_text[:1].upper() + help_text[1:]
        if is_auto:
            help_text = f"{help_text.rstrip('.')} (default: {auto[key]}).".lstrip(" ")
        opts.append(Opt(key, None if is_auto else getattr(inst, name), _annotation(cls, name, is_auto),
                        decls.get(key, (flags.get(key, flag_for(key)),)), help_text, (cls, name), is_auto))
    return opts


class Received:
    """What a declared command received, grouped back by where each option came from (the inverse of
    `from_fields`).

    ``got["out"]`` reads any option by its keyword (a command's own option, or a field's option under
    the keyword the command gave it); ``got.fields(cls)`` is ``{field: value}`` of the options built
    from `cls` (an ``auto`` option still None left out); ``got.build(cls, **extra)`` constructs `cls`
    from those fields and `extra`, filling each nested dataclass field whose class received options
    (``extra`` may give such a field a dict: more fields for the nested config, ``base={"device":
    dev}``). ``on=instance`` builds with `dataclasses.replace` from an instance instead of the class
    defaults (a cell's router: `substrate.config.CELL_ROUTER`). The values stay a plain dict
    (`values`) so a named bundle of settings can fill them before anything is built
    (`sweeps.factorial.resolve_setting`).
    """

    def __init__(self, opts: Iterable[Opt], values: dict[str, Any]):
        self.opts = tuple(opts)
        names = {o.name for o in self.opts}
        missing, extra = names - set(values), set(values) - names
        if missing or extra:
            raise TypeError(f"options not received: {sorted(missing)}; not declared: {sorted(extra)}")
        self.values = values

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def classes(self) -> list[type]:
        """The config classes some option came from, in the order of the options."""
        return list(dict.fromkeys(o.source[0] for o in self.opts if o.source is not None))

    def fields(self, cls: type) -> dict[str, Any]:
        """``{field: value}`` for the options of `cls`, auto options still None left out."""
        return {o.source[1]: self.values[o.name] for o in self.opts
                if o.source is not None and o.source[0] is cls and not (o.auto and self.values[o.name] is None)}

    def build(self, cls: type, on: Any = None, **extra: Any) -> Any:
        """`cls` (or `on` replaced) from its received fields, `extra` winning; nested dataclass
        fields of a class that received options are built the same way unless `extra` gives them."""
        given = self.classes()
        nested = {}
        for f in dataclasses.fields(cls):
            hint = _field_class(cls, f.name)
            if hint is None or (f.name in extra and not isinstance(extra[f.name], dict)):
                continue
            if hint in given or isinstance(extra.get(f.name), dict):
                inner = None if on is None else getattr(on, f.name)
                nested[f.name] = self.build(hint, on=inner, **extra.get(f.name, {}))
        values = {**self.fields(cls), **extra, **nested}
        return cls(**values) if on is None else dataclasses.replace(on, **values)


def _field_class(cls: type, name: str) -> type | None:
    """The dataclass a field of `cls` holds, or None (a plain value, or a hint that does not resolve)."""
    try:
        hint = typing.get_type_hints(cls).get(name)
    except (NameError, TypeError):
        return None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def declared(opts: list[Opt]) -> Callable[[Callable[[Received], Any]], Callable[..., Any]]:
    """The typer entry of ``fn(got)``: one keyword-only parameter per option, in order; what typer
    parses reaches `fn` as one `Received`."""
    names = [o.name for o in opts]
    if len(set(names)) != len(names):
        raise ValueError("options declared twice: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))

    def wrap(fn: Callable[[Received], Any]) -> Callable[..., Any]:
        def entry(**kw: Any) -> Any:
            return fn(Received(opts, kw))

        entry.__name__, entry.__qualname__, entry.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        entry.__module__ = fn.__module__
        entry.__signature__ = inspect.Signature([o.parameter() for o in opts], return_annotation=None)
        entry.__annotations__ = {o.name: o.annotation for o in opts}
        entry.__declared__ = tuple(opts)
        entry.__wrapped_command__ = fn
        return entry

    return wrap

"""The machinery every umt_fast command's config shares: validation helpers, field docstrings
and types, value conversion, ``config.yaml`` I/O and the ``--section.field`` command line.

A command describes its config once, as a :class:`ConfigSchema` (the root dataclass, its
sections, presets, choice fields and validation); the schema then parses argv, applies YAML
files and dicts, and builds the ``--help`` text from the fields' docstrings.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import yaml

TOP_LEVEL = ("preset", "run_dir", "resume")
"""The root fields of every run config, set with --preset / --run-dir / --resume."""


# --------------------------------------------------------------------------------------------
# Validation helpers: every failure names the dotted field, the value, and what is allowed.
# --------------------------------------------------------------------------------------------


def fail(name: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    # Written as `not ok` so that NaN (every comparison False) fails too.
    if not ok:
        fail(name, value, allowed)


def require_choice(name: str, value: Any, choices) -> None:
    choices = tuple(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        fail(name, value, f"must be one of {', '.join(map(repr, choices))}{hint}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_types(section: str, obj: Any) -> None:
    """Type-check every field of a section dataclass (catches e.g. `cfg.train.global_batch_size = "4"`)."""
    for f in dataclasses.fields(obj):
        name = f"{section}.{f.name}" if section else f.name
        typ = field_types(type(obj))[f.name]
        v = getattr(obj, f.name)
        if typ is bool:
            ok, what = isinstance(v, bool), "a bool"
        elif typ is int:
            ok, what = is_int(v), "an int"
        elif typ is float:
            ok, what = is_real(v), "a finite float"
        elif typ is str:
            ok, what = isinstance(v, str), "a string"
        elif typ == tuple[float, float]:
            ok = isinstance(v, tuple) and len(v) == 2 and all(is_real(x) for x in v)
            what = "a tuple of two finite floats"
        else:  # a section dataclass; checked separately
            continue
        require(ok, name, v, f"must be {what}")


def require_paths(checks: typing.Iterable[tuple[str, str, Callable[[str], bool]]]) -> None:
    """FileNotFoundError naming the field for the first (field, path, os.path.isfile / isdir /
    exists) whose path does not exist."""
    for name, path, exists in checks:
        if not exists(path):
            kind = "directory" if exists is os.path.isdir else "file"
            raise FileNotFoundError(f"{name}={path!r}: no such {kind}")


# --------------------------------------------------------------------------------------------
# Field introspection: types and docstrings
# --------------------------------------------------------------------------------------------

_DOCS_CACHE: dict[type, dict[str, str]] = {}
_TYPES_CACHE: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    if cls not in _TYPES_CACHE:
        _TYPES_CACHE[cls] = typing.get_type_hints(cls)
    return _TYPES_CACHE[cls]


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring under it in the class body, a subclass's overriding its
    parents' ({} where the source is unavailable)."""
    if cls not in _DOCS_CACHE:
        docs: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            if dataclasses.is_dataclass(klass):
                docs.update(_own_field_docs(klass))
        _DOCS_CACHE[cls] = docs
    return _DOCS_CACHE[cls]


# --------------------------------------------------------------------------------------------
# Conversion of user-given values (CLI strings, YAML/JSON values) to a field's type
# --------------------------------------------------------------------------------------------

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def convert(name: str, typ: Any, value: Any) -> Any:
    """Convert `value` (a CLI string or a YAML/JSON scalar) to `typ`; ValueError naming `name`."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if is_int(value) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        fail(name, value, "must be a bool: true/false, 1/0 or yes/no (any case)")
    if typ is int:
        if is_int(value):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        fail(name, value, "must be an integer")
    if typ is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                fail(name, value, "must be a number")
        if is_real(value):
            return float(value)
        fail(name, value, "must be a finite number")
    if typ is str:
        if isinstance(value, str):
            return value
        fail(name, value, "must be a string")
    if typ == tuple[float, float]:
        parts = value
        if isinstance(value, str):
            parts = [p for p in value.strip().strip("()[]").replace(",", " ").split()]
        if isinstance(parts, (list, tuple)) and len(parts) == 2:
            try:
                return tuple(convert(name, float, p) for p in parts)
            except ValueError:
                pass
        fail(name, value, "must be two numbers, e.g. 0.9,0.95")
    raise AssertionError(f"no converter for {name}: {typ}")


def set_field(cfg: Any, dotted: str, value: Any) -> None:
    """Set `section.field` (or a top-level field) on cfg, converting value to the field's type."""
    if "." in dotted:
        section, name = dotted.split(".", 1)
        obj = getattr(cfg, section)
    else:
        obj, name = cfg, dotted
    setattr(obj, name, convert(dotted, field_types(type(obj))[name], value))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists), in field order: what config.yaml/config.json hold."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_config(cfg: Any, run_dir: str | os.PathLike) -> Path:
    """Write <run_dir>/config.yaml and <run_dir>/config.json (creating run_dir); return the YAML path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    d = config_to_dict(cfg)
    yaml_path = run_dir / "config.yaml"
    _atomic_write(yaml_path, yaml.safe_dump(d, sort_keys=False))
    _atomic_write(run_dir / "config.json", json.dumps(d, indent=2) + "\n")
    return yaml_path


def load_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config file (.json as JSON, anything else as YAML) into a nested dict.

    FileNotFoundError if it is missing; ValueError if it does not hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"config file {str(path)!r} could not be parsed: {e}") from e
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of sections, got {type(d).__name__}")
    return d


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def show(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v)
    if isinstance(v, str):
        return repr(v)
    return str(v)


def esc(text: str) -> str:
    return text.replace("%", "%%")


class ArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose unknown options fail with exit 2 naming the option, an unknown
    section, and close matches; numeric values that start with '-' parse as values."""

    sections: typing.Sequence[str] = ()

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unknown_message(extras))
        return ns

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        # argparse takes a value such as "-1e-3" for an option name: glue numeric values that
        # start with "-" onto their option ("--optim.lr=-1e-3") so they parse as values.
        takes_value = {s for a in self._actions if a.nargs != 0 for s in a.option_strings}
        out: list[str] = []
        i = 0
        while i < len(args):
            if args[i] in takes_value and i + 1 < len(args) and args[i + 1].startswith("-"):
                try:
                    float(args[i + 1])
                except ValueError:
                    pass
                else:
                    out.append(f"{args[i]}={args[i + 1]}")
                    i += 2
                    continue
            out.append(args[i])
            i += 1
        return super().parse_known_args(out, namespace)

    def _unknown_message(self, extras: list[str]) -> str:
        options = [s for a in self._actions for s in a.option_strings]
        msgs = []
        for arg in extras:
            if not arg.startswith("--"):
                continue
            opt = arg.split("=", 1)[0]
            body = opt[2:]
            if "." in body and self.sections and body.split(".", 1)[0] not in self.sections:
                section = body.split(".", 1)[0]
                close = difflib.get_close_matches(section, self.sections, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                msgs.append(
                    f"unrecognized option {opt}: unknown section {section!r}{hint}; "
                    f"sections are {', '.join(self.sections)}"
                )
                continue
            close = difflib.get_close_matches(opt, options, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; see --help"
            msgs.append(f"unrecognized option {opt}{hint}")
        if not msgs:
            msgs.append(f"unrecognized arguments: {' '.join(extras)} (values go after --section.field)")
        return "\n".join(msgs)


@dataclass
class ConfigSchema:
    """One command's config: how to build, check, parse and print it.

    Attributes:
        root: the root dataclass (fields ``preset``, ``run_dir``, ``resume`` and one per section).
        sections: section name -> dataclass, in --help and config.yaml order.
        presets: preset name -> a function returning a fresh root config.
        validate: raises ValueError naming the first bad field.
        choices: dotted field -> its allowed values (for --help metavars).
        description: the command's one-line description for --help.
        prog: how the command is invoked, for --help.
        preset_help: preset name -> one line for --help (default: the preset function's docstring).
        shorthands: extra (flag, dotted field, help) options, e.g. ("--init", "model.init", ...).
        default_preset: used when neither --preset nor the YAML names one.
    """

    root: type
    sections: dict[str, type]
    presets: dict[str, Callable[[], Any]]
    validate: Callable[[Any], None]
    choices: dict[str, tuple] = field(default_factory=dict)
    description: str = ""
    prog: str = ""
    preset_help: dict[str, str] | None = None
    shorthands: tuple[tuple[str, str, str], ...] = ()
    default_preset: str = "demo"

    def all_field_names(self) -> list[str]:
        """Every settable key: 'preset', 'run_dir', 'resume' and 'section.field' for every field."""
        return list(TOP_LEVEL) + [f"{s}.{f.name}" for s, cls in self.sections.items() for f in dataclasses.fields(cls)]

    def get_preset(self, name: str) -> Any:
        if name not in self.presets:
            close = difflib.get_close_matches(str(name), self.presets, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fail("preset", name, f"must be one of {', '.join(map(repr, self.presets))}{hint}")
        return self.presets[name]()

    def _unknown_key(self, key: str, where: str) -> NoReturn:
        names = self.all_field_names()
        close = difflib.get_close_matches(key, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(names)}"
        raise ValueError(f"unknown config key {key!r}{where}{hint}")

    def apply_dict(self, cfg: Any, d: Any, where: str = "") -> None:
        """Apply a nested dict (the config.yaml layout) onto cfg, converting every value."""
        if not isinstance(d, dict):
            raise ValueError(f"a config{where} must be a mapping of sections, got {type(d).__name__}")
        for key, value in d.items():
            if key in TOP_LEVEL:
                set_field(cfg, key, value)
            elif key in self.sections:
                if value is None:  # an empty section in YAML
                    continue
                if not isinstance(value, dict):
                    raise ValueError(f"config key {key!r}{where} must be a mapping of fields, got {value!r}")
                known = {f.name for f in dataclasses.fields(self.sections[key])}
                for name, field_value in value.items():
                    if name not in known:
                        self._unknown_key(f"{key}.{name}", where)
                    set_field(cfg, f"{key}.{name}", field_value)
            else:
                self._unknown_key(str(key), where)

    def from_dict(self, d: dict[str, Any], check: bool = True) -> Any:
        """Inverse of config_to_dict: missing keys keep the dataclass defaults; unknown keys and
        badly typed values raise ValueError naming them; ``check`` runs the validation."""
        cfg = self.root()
        self.apply_dict(cfg, d)
        if check:
            self.validate(cfg)
        return cfg

    def _metavar(self, dotted: str, typ: Any) -> str:
        if dotted in self.choices:
            return "{" + ",".join(map(str, self.choices[dotted])) + "}"
        if typ == tuple[float, float]:
            return "B1,B2"
        return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}[typ]

    def make_arg_parser(self, prog: str | None = None) -> ArgumentParser:
        """--preset, --run-dir, --resume, --config, the shorthands and one ``--section.field
        VALUE`` option per field. Every option defaults to argparse.SUPPRESS, so only what the
        command line gives overrides the preset / YAML; values stay strings until `build`
        converts them by the field's type."""
        helps = self.preset_help or {name: fn.__doc__ or "" for name, fn in self.presets.items()}
        presets = "\n".join(f"  {name:<14} {helps.get(name, '')}" for name in self.presets)
        parser = ArgumentParser(
            prog=prog or self.prog or None,
            description=self.description,
            epilog=(
                f"presets:\n{presets}\n\n"
                "Values are applied in this order: the preset, then --config FILE, then --section.field options.\n"
                "Defaults shown under each section are the dataclass defaults; the chosen preset replaces\n"
                "them. Every bad value is reported before any work starts."
            ),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
            argument_default=argparse.SUPPRESS,
        )
        parser.sections = tuple(self.sections)
        top_docs = field_docs(self.root)
        parser.add_argument(
            "--preset", metavar="NAME",
            help=f"starting values: one of {', '.join(self.presets)} (default: {self.default_preset!r})",
        )
        parser.add_argument("--run-dir", dest="run_dir", metavar="DIR", help=esc(top_docs.get("run_dir", "")))
        parser.add_argument(
            "--resume", metavar="{auto,none,PATH}", help=esc(top_docs.get("resume", "")) + " (default: 'auto')"
        )
        for flag, dotted, text in self.shorthands:
            parser.add_argument(flag, dest=dotted, metavar="VALUE", help=esc(text))
        parser.add_argument(
            "--config", metavar="FILE",
            help="YAML (or .json) file with nested sections, e.g. a run's config.yaml; applied after "
            "the preset and before the --section.field options",
        )
        for sec, cls in self.sections.items():
            group = parser.add_argument_group(sec, esc(cls.__doc__ or ""))
            docs, types = field_docs(cls), field_types(cls)
            for f in dataclasses.fields(cls):
                dotted = f"{sec}.{f.name}"
                group.add_argument(
                    f"--{dotted}", dest=dotted, metavar=self._metavar(dotted, types[f.name]),
                    help=esc(f"{docs.get(f.name, '')} (default: {show(f.default)})".strip()),
                )
        return parser

    def build(self, argv: list[str] | None = None, prog: str | None = None) -> Any:
        """argv (sys.argv[1:] if None) -> a validated config.

        preset (--preset, else the YAML's `preset`, else the default) < --config YAML <
        --section.field options. ValueError for an unknown preset or any bad value; exit code 2
        for an unknown option."""
        args = vars(self.make_arg_parser(prog).parse_args(sys.argv[1:] if argv is None else argv))
        file_dict: dict[str, Any] = {}
        where = ""
        if "config" in args:
            config_path = args.pop("config")
            file_dict = load_config_dict(config_path)
            where = f" in config file {str(config_path)!r}"
        preset = args.pop("preset", None) or file_dict.get("preset") or self.default_preset
        cfg = self.get_preset(preset)
        self.apply_dict(cfg, {k: v for k, v in file_dict.items() if k != "preset"}, where)
        cfg.preset = preset
        for dotted, raw in args.items():
            set_field(cfg, dotted, raw)
        self.validate(cfg)
        return cfg

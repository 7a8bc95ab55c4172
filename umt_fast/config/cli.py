"""What every umt_fast command's config shares: the `Section` base, validation helpers, value
conversion, ``config.yaml`` I/O and the command line (tyro).

A command describes its config once, as a :class:`ConfigSchema`: the root dataclass (a
`RunConfig`: ``preset``, ``run_dir``, ``resume`` and one field per section), its presets and its
validation. The schema then parses argv, applies YAML files and dicts, and gives ``--help``.

Where the values come from, lowest precedence first (as in lingua): the preset, then a YAML
file given with ``--config FILE`` (the nested layout of the ``config.yaml`` written into every run
directory), then ``--section.field VALUE`` options. tyro turns the dataclasses into the command
line: one option per field, in either spelling (``--train.max_steps`` or ``--train.max-steps``),
``Literal`` fields as choices, the field docstrings as help. Bad values raise ValueError naming
the dotted field (``mask.ratio``), the value and what is allowed, before anything is built;
a value that does not parse at all (``--train.seed four``) and an unknown option exit with code 2
and tyro's message naming the option.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import difflib
import io
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, NoReturn

import tyro
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
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        fail(name, value, f"must be one of {', '.join(map(repr, choices))}{hint}")


def require_paths(checks: typing.Iterable[tuple[str, str, Callable[[str], bool]]]) -> None:
    """FileNotFoundError naming the field for the first (field, path, os.path.isfile / isdir /
    exists) whose path does not exist."""
    for name, path, exists in checks:
        if "://" in path:  # an fsspec URL: read (and reported) where it is used
            continue
        if not exists(path):
            kind = "directory" if exists is os.path.isdir else "file"
            raise FileNotFoundError(f"{name}={path!r}: no such {kind}")


def check_path_fields(cfg: Any, fields: dict[str, tuple[Callable[[str], bool], tuple[str, ...]]]) -> None:
    """FileNotFoundError for the first path field that does not exist: ``fields`` maps a dotted
    field to (os.path.isfile / isdir / exists, the values that are not paths); '' is never a path,
    and ``resume`` (auto / none / a checkpoint directory) is always checked."""
    checks = []
    for dotted, (exists, not_paths) in {**fields, "resume": (os.path.isdir, ("auto", "none"))}.items():
        section, _, name = dotted.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if value not in ("", *not_paths):
            checks.append((dotted, value, exists))
    require_paths(checks)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _reflow(text: str) -> str:
    """A field docstring as one paragraph per blank-line-separated block (tyro keeps the break
    before every indented continuation line of a docstring written inside a class)."""
    return "\n\n".join(" ".join(block.split()) for block in text.split("\n\n"))


tyro._strings.remove_single_line_breaks = _reflow  # the one tyro behaviour changed here: help text only


# --------------------------------------------------------------------------------------------
# Field types: bool and (float, float) take one value on the command line, as in config.yaml
# --------------------------------------------------------------------------------------------

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word not in _TRUE + _FALSE:
        raise ValueError(f"{text!r} is not a bool: true/false, 1/0 or yes/no (any case)")
    return word in _TRUE


def parse_pair(text: str) -> tuple[float, float]:
    parts = text.strip().strip("()[]").replace(",", " ").split()
    try:
        a, b = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not two numbers, e.g. 0.9,0.95") from None
    return a, b


Bool = Annotated[
    bool,
    tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="BOOL", instance_from_str=lambda args: parse_bool(args[0]),
        is_instance=lambda v: isinstance(v, bool), str_from_instance=lambda v: [str(v).lower()],
    ),
    tyro.conf.FlagConversionOff,
]
"""A bool that takes a value on the command line: true/false, 1/0 or yes/no, any case."""

Pair = Annotated[
    tuple[float, float],
    tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="A,B", instance_from_str=lambda args: parse_pair(args[0]),
        is_instance=lambda v: isinstance(v, tuple), str_from_instance=lambda v: [",".join(map(str, v))],
    ),
]
"""Two floats, written 0.9,0.95 on the command line (or [0.9, 0.95] in YAML)."""


def entry_text(entry: Any) -> Any:
    """One entry of a list-of-strings field as written in a config file: a mapping becomes its
    one-line form 'key=value,key=value' (as on the command line); anything else is kept."""
    if isinstance(entry, dict):
        return ",".join(f"{k}={v}" for k, v in entry.items())
    return entry


def parse_entry(text: str, where: str, keys: tuple[str, ...], required: tuple[str, ...], example: str) -> dict[str, str]:
    """One 'key=value,key=value' entry of a list field (teacher.extra, data.mix) -> its key ->
    value strings; ValueError naming ``where`` for a malformed part, an unknown key or a
    missing required one."""
    out: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not value.strip():
            raise ValueError(f"{where}={text!r} is not allowed: each part must be KEY=VALUE, with KEY one of "
                             f"{', '.join(keys)}; got {part!r}")  # fmt: skip
        require_choice(f"{where} key", key, keys)
        out[key] = value.strip()
    missing = [k for k in required if k not in out]
    require(not missing, where, text, f"needs {', '.join(missing)} (e.g. {example})")
    return out


def _base_type(typ: Any) -> Any:
    return typing.get_args(typ)[0] if typing.get_origin(typ) is Annotated else typ


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> its type, Annotated wrappers removed."""
    return {name: _base_type(t) for name, t in typing.get_type_hints(cls, include_extras=True).items()}


def _type_error(name: str, value: Any, typ: Any) -> str | None:
    """Why ``value`` is not of field type ``typ`` (None when it is)."""
    if typing.get_origin(typ) is Literal:
        choices = typing.get_args(typ)
        if value in choices and type(value) is type(choices[0]):
            return None
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"must be one of {', '.join(map(repr, choices))}{hint}"
    ok, what = {
        bool: (isinstance(value, bool), "a bool"),
        int: (is_int(value), "an int"),
        float: (is_real(value), "a finite float"),
        str: (isinstance(value, str), "a string"),
    }.get(typ, (True, ""))
    if typ == tuple[float, float]:
        ok = isinstance(value, tuple) and len(value) == 2 and all(is_real(x) for x in value)
        what = "a tuple of two finite floats"
    if typ == tuple[str, ...]:
        ok = isinstance(value, tuple) and all(isinstance(x, str) for x in value)
        what = "a list of strings"
    return None if ok else f"must be {what}"


def check_types(section: str, obj: Any) -> None:
    """Type-check every field of a dataclass (catches e.g. ``cfg.train.global_batch_size = "4"``)."""
    for name, typ in field_types(type(obj)).items():
        if dataclasses.is_dataclass(typ):
            continue
        value = getattr(obj, name)
        problem = _type_error(name, value, typ)
        if problem:
            fail(f"{section}.{name}" if section else name, value, problem)


def convert(name: str, typ: Any, value: Any) -> Any:
    """A YAML / JSON value (or a string) as field type ``typ``; ValueError naming ``name``."""
    try:
        if isinstance(value, str) and typ is not str:
            if typ is bool:
                value = parse_bool(value)
            elif typ is int:
                value = int(value.strip())
            elif typ is float:
                value = float(value.strip())
            elif typ == tuple[float, float]:
                value = parse_pair(value)
            elif typ == tuple[str, ...]:
                value = (value,)
            elif typing.get_origin(typ) is Literal and not isinstance(typing.get_args(typ)[0], str):
                value = int(value.strip())
        elif typ is bool and is_int(value) and value in (0, 1):
            value = bool(value)
        elif typ is float and is_int(value):
            value = float(value)
        elif typ == tuple[float, float] and isinstance(value, list):
            value = tuple(float(v) if is_int(v) else v for v in value)
        elif typ == tuple[str, ...] and isinstance(value, (list, dict)):
            value = tuple(entry_text(v) for v in (value if isinstance(value, list) else [value]))
    except ValueError as exc:
        fail(name, value, str(exc))
    problem = _type_error(name, value, typ)
    if problem:
        fail(name, value, problem)
    return value


# --------------------------------------------------------------------------------------------
# Sections: dataclasses that check themselves
# --------------------------------------------------------------------------------------------

_DEFER_CHECKS = contextvars.ContextVar("defer_checks", default=False)


@dataclass
class Section:
    """A config section: a dataclass whose fields carry docstrings, checked in `__post_init__`
    (and again by the command's `validate`, which also sees later assignments).

    Subclasses set ``SECTION`` (the name in ``--SECTION.field`` and config.yaml) and extend
    `validate` with their rules, each raising ValueError naming the dotted field.
    """

    SECTION: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not _DEFER_CHECKS.get():
            self.validate()

    def validate(self) -> None:
        check_types(self.SECTION, self)


@dataclass
class RunConfig:
    """The root fields every command's config starts with."""

    preset: str = ""
    """Name of the preset the config started from ('' = the dataclass defaults); informational."""
    run_dir: Annotated[str, tyro.conf.arg(name="run-dir")] = ""
    """Run directory (config.yaml/.json, metrics.jsonl, checkpoints/, log.txt); '' = the launcher
    picks one (runs/PRESET-DATE-TIME).
    """
    resume: str = "auto"
    """auto: resume from the newest checkpoint in run_dir if there is one; none: start fresh; or a
    checkpoint directory (run_dir/checkpoints/step_N).
    """


def sections_of(root: type) -> dict[str, type]:
    """Section name -> dataclass, in the root's field order (config.yaml and --help order)."""
    return {name: typ for name, typ in field_types(root).items() if dataclasses.is_dataclass(typ)}


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
    """Write <run_dir>/config.yaml and <run_dir>/config.json (creating run_dir); return the YAML path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    d = config_to_dict(cfg)
    yaml_path = run_dir / "config.yaml"
    _atomic_write(yaml_path, yaml.safe_dump(d, sort_keys=False))
    _atomic_write(run_dir / "config.json", json.dumps(d, indent=2) + "\n")
    return yaml_path


HISTORY_FILE = "config_history.jsonl"
"""In a run directory: one line per resume that changed the config ({"time", "step", "set"})."""


def differing_fields(saved: dict, current: dict, prefix: str = "", defaults: dict | None = None
                     ) -> dict[str, tuple[Any, Any]]:  # fmt: skip
    """``{"section.field": (old, new)}`` for every config value that differs (resume and run dir aside).

    ``defaults`` (the root config's dict): what a key absent from ``saved`` stands for, so that a
    field added since the run was saved is not a change unless it is set to something else."""
    out: dict[str, tuple[Any, Any]] = {}
    defaults = defaults or {}
    for key in [*saved, *(k for k in current if k not in saved)]:
        a, b = saved.get(key, defaults.get(key)), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = defaults.get(key)
            out.update(differing_fields(a, b, f"{prefix}{key}.", inner if isinstance(inner, dict) else None))
        elif a != b and key not in ("resume", "run_dir"):
            out[f"{prefix}{key}"] = (a, b)
    return out


def saved_run_config(run_dir: str) -> dict[str, Any] | None:
    """The config a run directory's run last trained with: its config.yaml (written when the run
    started) with the changes of every resume (config_history.jsonl) applied; None without one."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    d = load_config_dict(path)
    history = os.path.join(run_dir, HISTORY_FILE)
    if os.path.isfile(history):
        for line in open(history, encoding="utf-8"):
            try:
                changes = json.loads(line)["set"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
            for dotted, value in changes.items():
                section, _, name = dotted.rpartition(".")
                (d.setdefault(section, {}) if section else d)[name] = value
    return d


def append_config_history(run_dir: str, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    with open(os.path.join(run_dir, HISTORY_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "step": step,
                            "set": {k: new for k, (_, new) in changes.items()}}) + "\n")  # fmt: skip


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
# One command's config
# --------------------------------------------------------------------------------------------


@dataclass
class ConfigSchema:
    """One command's config: how to build, check, parse and print it.

    Attributes:
        root: the root dataclass (a RunConfig with one field per section).
        presets: preset name -> a function returning a fresh root config.
        validate: the command's own checks (cross-field rules, required values), run after
            every section's and the root fields'; raises ValueError naming the first bad field.
        description: the command's one-line description for --help.
        prog: how the command is invoked, for --help.
        preset_help: preset name -> one line for --help (default: the preset function's docstring).
        shorthands: (flag, dotted field) options, e.g. ("--init", "model.init").
        aliases: old dotted name -> the field it now sets, on the command line and in files.
        default_preset: used when neither --preset nor the YAML names one.
        resolve: called as resolve(cfg, preset) once the command line is applied, before the
            checks: derives what depends on what the user set (e.g. drops a preset's list).
    """

    root: type
    presets: dict[str, Callable[[], Any]]
    validate: Callable[[Any], None]
    description: str = ""
    prog: str = ""
    preset_help: dict[str, str] | None = None
    shorthands: tuple[tuple[str, str], ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    default_preset: str = "demo"
    resolve: Callable[[Any, Any], None] | None = None

    @property
    def sections(self) -> dict[str, type]:
        return sections_of(self.root)

    def all_field_names(self) -> list[str]:
        """Every settable key: 'preset', 'run_dir', 'resume' and 'section.field' for every field."""
        return list(TOP_LEVEL) + [f"{s}.{f.name}" for s, cls in self.sections.items() for f in dataclasses.fields(cls)]

    def get_preset(self, name: str) -> Any:
        if name not in self.presets:
            require_choice("preset", name, self.presets)
        return self.presets[name]()

    def check(self, cfg: Any) -> None:
        """Every check: the root fields, each section's own rules, then the command's."""
        if not isinstance(cfg, self.root):
            raise TypeError(f"expected a {self.root.__name__}, got {type(cfg).__name__}")
        check_types("", cfg)
        if cfg.preset:
            require_choice("preset", cfg.preset, self.presets)
        require(cfg.resume != "", "resume", cfg.resume, "must be 'auto', 'none' or the path of a checkpoint directory")
        for name, cls in self.sections.items():
            section = getattr(cfg, name)
            require(isinstance(section, cls), name, section, f"must be a {cls.__name__}")
            section.validate()
        self.validate(cfg)

    def _unknown_key(self, key: str, where: str) -> NoReturn:
        names = self.all_field_names()
        close = difflib.get_close_matches(key, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(names)}"
        raise ValueError(f"unknown config key {key!r}{where}{hint}")

    def apply_dict(self, cfg: Any, d: Any, where: str = "") -> None:
        """Apply a nested dict (the config.yaml layout) onto cfg, converting every value."""
        if not isinstance(d, dict):
            raise ValueError(f"a config{where} must be a mapping of sections, got {type(d).__name__}")
        sections = self.sections
        for key, value in d.items():
            if key in TOP_LEVEL:
                setattr(cfg, key, convert(key, str, value))
            elif key in sections:
                if value is None:  # an empty section in YAML
                    continue
                if not isinstance(value, dict):
                    raise ValueError(f"config key {key!r}{where} must be a mapping of fields, got {value!r}")
                section = getattr(cfg, key)
                types = field_types(type(section))
                for name, field_value in value.items():
                    dotted = self.aliases.get(f"{key}.{name}", f"{key}.{name}")
                    name = dotted.split(".", 1)[1]
                    if name not in types:
                        self._unknown_key(dotted, where)
                    setattr(section, name, convert(dotted, types[name], field_value))
            else:
                self._unknown_key(str(key), where)

    def from_dict(self, d: dict[str, Any], check: bool = True) -> Any:
        """Inverse of config_to_dict: missing keys keep the dataclass defaults; unknown keys and
        badly typed values raise ValueError naming them; ``check`` runs the validation."""
        cfg = self.root()
        self.apply_dict(cfg, d)
        if check:
            self.check(cfg)
        return cfg

    def _description(self) -> str:
        helps = self.preset_help or {name: " ".join((fn.__doc__ or "").split()) for name, fn in self.presets.items()}
        presets = "\n".join(f"  {name:<14} {helps.get(name, '')}" for name in self.presets)
        shorthands = "".join(f"  {flag} VALUE  shorthand for --{dotted} VALUE\n" for flag, dotted in self.shorthands)
        aliases = "".join(f"  --{old} VALUE  the old spelling of --{new}\n" for old, new in self.aliases.items())
        return (
            f"{self.description}\n\n"
            f"  --preset NAME  starting values, one of (default {self.default_preset!r}):\n{presets}\n"
            "  --config FILE  a YAML (or .json) file with nested sections, e.g. a run's config.yaml\n"
            f"{shorthands}{aliases}"
            "  --allow-config-changes  resume a run even where the options change its model or data\n\n"
            "A run directory with a checkpoint resumes with the config it trained with (its config.yaml and "
            "the changes of earlier resumes, config_history.jsonl); the options given change it, and are printed.\n"
            "Values apply in this order: the preset, then --config FILE, then --section.field options. "
            "The defaults shown are the chosen preset's. Every bad value is reported before any work starts."
        )

    def _tyro_parse(self, default: Any, args: list[str], prog: str | None) -> Any:
        token = _DEFER_CHECKS.set(True)  # every check runs once, in `check`, after the whole config is known
        try:
            return tyro.cli(
                self.root, args=args, default=default, prog=prog or self.prog, description=self._description(),
                use_underscores=True,
            )  # fmt: skip
        finally:
            _DEFER_CHECKS.reset(token)

    def help_text(self, preset: str | None = None) -> str:
        """What ``--help`` prints (with the defaults of ``preset``, or the default preset)."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            self._tyro_parse(self.get_preset(preset or self.default_preset), ["--help"], None)
        return out.getvalue()

    def build(self, argv: list[str] | None = None, prog: str | None = None, base: dict | None = None) -> Any:
        """argv (sys.argv[1:] if None) -> a validated config.

        preset (--preset, else the YAML's `preset`, else the default) < --config YAML <
        --section.field options. ``base`` (a resumed run's saved config, `saved_run_config`)
        takes the preset's place. ValueError for an unknown preset or any bad value; exit code 2
        for an unknown option or a value that does not parse."""
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--preset")
        pre.add_argument("--config")
        for flag, dotted in self.shorthands:
            pre.add_argument(flag, dest=dotted)
        known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
        for flag, dotted in self.shorthands:
            if getattr(known, dotted) is not None:
                rest += [f"--{dotted}", getattr(known, dotted)]
        rest = [self._resolve_alias(arg) for arg in rest]
        file_dict: dict[str, Any] = {}
        where = ""
        if known.config is not None:
            file_dict = load_config_dict(known.config)
            where = f" in config file {known.config!r}"
        if base is not None:
            cfg = self.from_dict(base, check=False)
            preset = cfg.preset
        else:
            preset = known.preset or file_dict.get("preset") or self.default_preset
            cfg = self.get_preset(preset)
        self.apply_dict(cfg, {k: v for k, v in file_dict.items() if k != "preset"}, where)
        cfg = self._tyro_parse(cfg, rest, prog)
        cfg.preset = preset
        if self.resolve is not None and base is None:
            self.resolve(cfg, self.get_preset(preset))
        self.check(cfg)
        return cfg

    def _resolve_alias(self, arg: str) -> str:
        option, eq, value = arg.partition("=")
        dotted = option[2:].replace("-", "_") if option.startswith("--") else ""
        return f"--{self.aliases[dotted]}{eq}{value}" if dotted in self.aliases else arg

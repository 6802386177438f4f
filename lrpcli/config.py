"""Load, validate and resolve an ``lrpcli`` YAML config (DESIGN.md section 2).

Every problem becomes one :class:`~lrpcli.errors.ConfigError` line that names the file (or ``command line``
for overrides), the dotted key path, the value at fault and what is allowed, so a user never sees a traceback
for a typo. The result is a frozen, fully resolved :class:`Config`; ``to_yaml()`` is stored with the results.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .catalogue import (
    CANONIZER_NAMES,
    COMPOSITES,
    COMPRESSIONS,
    MAXPOOL_MODES,
    PARAMS,
    RULE_ALIASES,
    RULE_NAMES,
    STABILIZER_MODES,
    ZERO_PARAMS,
)
from .errors import ConfigError, ConfigWarning

__all__ = ["Config", "read_config", "validate", "check_rules", "check_rule_spec", "bounds_value", "resolve_path",
           "channels", "show", "did_you_mean", "matches", "DEFAULTS"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# For mode L without an explicit mean/std: the average of the ImageNet channel statistics.
GRAY_MEAN = [0.449]
GRAY_STD = [0.226]

METHODS = ("lrp", "gradient", "input_x_gradient", "smoothgrad", "integrated_gradients", "occlusion")
BASELINES = ("zeros", "black", "white")

def _composite_defaults() -> dict[str, Any]:
    """The composite section's defaults: the declared parameters (lrpcli.catalogue), rules after stabilizer."""
    out: dict[str, Any] = {"name": "epsilon_gamma_box"}
    for key, param in PARAMS.items():
        out[key] = param.config_default()
        if key == "stabilizer":
            out["rules"] = []
    return {**out, "strict": False}


# The resolved defaults; model.name/entrypoint have none (exactly one is required). Order = output order.
DEFAULTS: dict[str, Any] = {
    "model": {"name": None, "entrypoint": None, "weights": None, "kwargs": {}},
    "input": {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "mode": "RGB"},
    "canonizers": [],
    "composite": _composite_defaults(),
    "attribution": {
        "method": "lrp",
        "target": "label",
        "noise_level": 0.1,
        "n_iter": 20,
        "baseline": "zeros",
        "window": [8, 8],
        "stride": [8, 8],
        "fill": 0.0,
    },
    "run": {"batch_size": 16, "num_workers": "auto", "device": "auto", "max_samples": None, "seed": 0},
    "output": {"path": "out.h5", "dtype": "float32", "store_input": True, "layers": [], "compression": "auto"},
}
SECTIONS = tuple(DEFAULTS)
# ``canonizers`` may also be written inside ``composite``; it is resolved to the top level.
_COMPOSITE_KEYS = (*DEFAULTS["composite"], "canonizers")


# --------------------------------------------------------------------------------------------------- Config
class Config(Mapping):
    """A frozen, resolved config: attribute and item access, ``to_dict()``, ``to_yaml()``, ``base_dir``.

    Sub-sections are Configs too (``config.model.name``) and remember the file they came from, so code that
    only gets ``config.model`` can still name the file in its errors (``config.model.source``).
    """

    __slots__ = ("_data", "_source", "_base_dir", "_prefix")

    def __init__(
        self, data: Mapping, *, source: str = "config", base_dir: str | Path = ".", prefix: str = ""
    ):
        object.__setattr__(self, "_data", dict(data))
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_base_dir", Path(base_dir))
        object.__setattr__(self, "_prefix", prefix)

    # Mapping protocol -------------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self._wrap(self._data[key], f"{self._prefix}{key}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            where = self._prefix.rstrip(".") or "config"
            raise AttributeError(f"{where} has no key {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> NoReturn:
        raise AttributeError("Config is frozen; use load_config(..., overrides=...) to change values")

    def __delattr__(self, key: str) -> NoReturn:
        raise AttributeError("Config is frozen")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Config):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Config({self._data!r})"

    def __reduce__(self):
        return (_rebuild, (self._data, self._source, str(self._base_dir), self._prefix))

    def _wrap(self, value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return Config(value, source=self._source, base_dir=self._base_dir, prefix=path + ".")
        if isinstance(value, list):
            return tuple(self._wrap(v, f"{path}[{i}]") for i, v in enumerate(value))
        return value

    # Public helpers ---------------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """The config file as the user named it (used at the start of error messages)."""
        return self._source

    @property
    def base_dir(self) -> Path:
        """The config file's directory: relative entrypoint and weights paths are looked up here first."""
        return self._base_dir

    @property
    def prefix(self) -> str:
        """The dotted path of this section (``"model."``), empty for the root."""
        return self._prefix

    def to_dict(self) -> dict[str, Any]:
        """A deep, plain-Python copy (defaults filled), safe to modify."""
        return _deepcopy(self._data)

    def to_yaml(self) -> str:
        """The resolved config as YAML; ``load_config`` reads it back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError for ``key`` of this section, in the usual ``file: key.path: message`` form."""
        return ConfigError(f"{self._source}: {self._prefix}{key}: {message}")


def _rebuild(data: dict, source: str, base_dir: str, prefix: str) -> Config:
    return Config(data, source=source, base_dir=base_dir, prefix=prefix)


def _deepcopy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_deepcopy(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ error helpers
def show(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it in YAML: strings quoted, null/true/false, long values shortened."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, Mapping | list | tuple):
        try:
            text = yaml.safe_dump(_deepcopy(value), default_flow_style=True, width=10**6).strip()
        except yaml.YAMLError:
            text = repr(value)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: str, candidates: list[str] | tuple[str, ...], *, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` when a candidate is close to ``word``, else an empty string."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=cutoff)
    if not close:
        lowered = {str(c).lower(): c for c in candidates}
        if str(word).lower() in lowered:
            close = [lowered[str(word).lower()]]
    return f"; did you mean {close[0]!r}?" if close else ""


class _Ctx:
    """Where values came from: errors on overridden keys say ``command line`` instead of the file."""

    def __init__(self, source: str, overridden: set[str] | None = None):
        self.source = source
        self.overridden = overridden or set()

    def origin(self, path: str) -> str:
        path = str(path)
        for key in self.overridden:
            if path == key or path.startswith(key + ".") or path.startswith(key + "["):
                return "command line"
        return self.source

    def fail(self, path: str, message: str) -> NoReturn:
        raise ConfigError(f"{self.origin(path)}: {path}: {message}")

    def expected(self, path: str, what: str, value: Any) -> NoReturn:
        self.fail(path, f"expected {what}, got {show(value)}")


# ------------------------------------------------------------------------------------- scalar validators
_NUMBER_RE = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")


def _number(ctx: _Ctx, path: str, value: Any, *, minimum: float | None = None, strict: bool = False) -> float:
    """A finite number; numeric strings such as ``1e-6`` (which YAML 1.1 reads as a string) are accepted."""
    what = "a number" if minimum is None else f"a number {'>' if strict else '>='} {minimum:g}"
    if isinstance(value, bool):
        ctx.expected(path, what, value)
    if isinstance(value, str) and _NUMBER_RE.match(value):
        value = float(value)
    if not isinstance(value, int | float) or not math.isfinite(value):
        ctx.expected(path, what, value)
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        ctx.expected(path, what, value)
    return value if isinstance(value, int) else float(value)


def _integer(ctx: _Ctx, path: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
             nullable: bool = False) -> Any:
    what = "an integer" if minimum is None else f"an integer >= {minimum}"
    if maximum is not None:
        what = f"an integer from {minimum} to {maximum}" if minimum is not None else f"an integer <= {maximum}"
    if nullable:
        what += " or null"
        if value is None:
            return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        ctx.expected(path, what, value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        ctx.expected(path, what, value)
    return value


def _boolean(ctx: _Ctx, path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        ctx.expected(path, "true or false", value)
    return value


def _string(ctx: _Ctx, path: str, value: Any, *, nullable: bool = False) -> Any:
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not value.strip():
        ctx.expected(path, "a non-empty string" + (" or null" if nullable else ""), value)
    return value


def _choice(ctx: _Ctx, path: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    """One of ``choices``, matched case-insensitively and returned in its canonical spelling."""
    if isinstance(value, str):
        for choice in choices:
            if value.strip().lower() == choice.lower():
                return choice
    hint = did_you_mean(value, choices) if isinstance(value, str) else ""
    ctx.fail(path, f"expected one of {', '.join(choices)}, got {show(value)}{hint}")


def _mapping(ctx: _Ctx, path: str, value: Any, *, nullable: bool = True) -> dict:
    if value is None and nullable:
        return {}
    if not isinstance(value, Mapping):
        ctx.expected(path, "a mapping (key: value lines)", value)
    for key in value:
        if not isinstance(key, str):
            ctx.fail(f"{path}.{key}", f"keys must be strings, got {show(key)}")
    return dict(value)


def _list(ctx: _Ctx, path: str, value: Any, what: str, *, nullable: bool = True) -> list:
    if value is None and nullable:
        return []
    if not isinstance(value, list | tuple):
        ctx.expected(path, what, value)
    return list(value)


def _check_keys(ctx: _Ctx, path: str, given: Mapping, allowed: tuple[str, ...] | list[str]) -> None:
    """Unknown keys are errors; suggest a close key here, or the same key in another section."""
    for key in given:
        if key in allowed:
            continue
        full = f"{path}.{key}" if path else key
        hint = did_you_mean(key, allowed)
        if not hint:
            elsewhere = [
                f"{section}.{key}"
                for section in SECTIONS
                if isinstance(DEFAULTS[section], dict) and key in DEFAULTS[section] and section != path
            ]
            if key == "canonizers" and path:
                elsewhere = ["canonizers"]
            if elsewhere:
                hint = f"; did you mean {elsewhere[0]!r}?"
        ctx.fail(full, f"unknown key{hint} (allowed: {', '.join(allowed)})")


# ------------------------------------------------------------------------------------------- YAML loading
#: Bounds on a config document, so a hostile file cannot hang or crash the loader: its size in bytes, how deeply
#: lists and mappings nest, and how many values it holds once every alias is expanded (a YAML alias repeats a
#: whole anchored list or mapping, so a few hundred bytes can stand for billions of values).
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one) and documents beyond
    ``MAX_DEPTH`` levels or ``MAX_NODES`` values with aliases expanded (checked while composing, before
    any Python object is built, in time linear in the document's size)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values it stands for, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._sizes:
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} refers to its own anchor (a recursive structure)",
                    event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"lists and mappings nest deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(node)
        return node

    def _count(self, node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        self._sizes[id(node)] = size
        if size > MAX_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_NODES:,} values with aliases expanded (an alias bomb?)",
                node.start_mark)


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, list):
            key = tuple(key)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        except TypeError:  # unhashable key: let PyYAML report it
            pass
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path, label: str) -> Any:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{label}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a config file is at most that")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a directory, expected a YAML config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{label}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{label}: cannot read config file: {err.strerror or err}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = str(err.problem or err.context or "syntax error")
        if err.context and err.problem:
            problem += f" ({err.context}"
            if err.context_mark and err.problem_mark and err.context_mark.line != err.problem_mark.line:
                problem += f" that starts on line {err.context_mark.line + 1}"
            problem += ")"
        raise ConfigError(f"{label}: {where}invalid YAML: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{label}: invalid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:  # a backstop: compose_node bounds the depth well below Python's limit
        raise ConfigError(f"{label}: invalid YAML: nested too deeply (at most {MAX_DEPTH} levels)") from None


# ------------------------------------------------------------------------------------------ entry points
def read_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read, validate and resolve a config file; ``overrides`` are dotted keys from command-line options.

    Names are checked against ``lrpcli.catalogue``; ``lrpcli.build.load_config`` adds the checks that need the
    engine (the torchvision model, module classes, a rule's own parameter checks).

    Override values of ``None`` are ignored (an option that was not given). Overrides are validated exactly
    like file values, and their errors say ``command line`` instead of the file name.
    """
    label = str(path)
    path = Path(path)
    raw = _read_yaml(path, label)
    if raw is None:
        raise ConfigError(f"{label}: the config is empty; it needs at least model.name or model.entrypoint")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{label}: expected a mapping of sections (model, input, ...), got {show(raw)}")
    base_dir = path.resolve().parent
    return validate(raw, source=label, base_dir=base_dir, overrides=overrides)


def validate(
    raw: Mapping[str, Any],
    *,
    source: str = "config",
    base_dir: str | Path = ".",
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Validate an already-parsed config mapping (what ``load_config`` does after reading the YAML)."""
    try:
        raw = _deepcopy(raw)
    except RecursionError:  # a mapping built in Python (files are bounded by MAX_DEPTH when read)
        raise ConfigError(f"{source}: nested too deeply (at most {MAX_DEPTH} levels)") from None
    ctx = _Ctx(source)
    if overrides:
        raw = _apply_overrides(ctx, raw, overrides)
    _check_keys(ctx, "", raw, SECTIONS)
    out: dict[str, Any] = {}
    out["model"] = _validate_model(ctx, raw.get("model"))
    out["input"] = _validate_input(ctx, raw.get("input"))
    composite_raw = _mapping(ctx, "composite", raw.get("composite"))
    out["canonizers"] = _validate_canonizers(ctx, raw, composite_raw)
    out["composite"] = _validate_composite(ctx, composite_raw, out["input"])
    out["attribution"] = _validate_attribution(ctx, raw.get("attribution"))
    out["run"] = _validate_run(ctx, raw.get("run"))
    out["output"] = _validate_output(ctx, raw.get("output"))
    _warn_unused(ctx, raw, out)
    return Config(out, source=source, base_dir=base_dir)


# The keys only some attribution methods read (all others are read by every method).
_METHOD_ATTRIBUTION_KEYS = ("noise_level", "n_iter", "baseline", "window", "stride", "fill")
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "lrp": ("composite", "canonizers", "output.layers"),
    "gradient": (),
    "input_x_gradient": (),
    "smoothgrad": ("attribution.noise_level", "attribution.n_iter"),
    "integrated_gradients": ("attribution.n_iter", "attribution.baseline"),
    "occlusion": ("attribution.window", "attribution.stride", "attribution.fill"),
}


def unused_keys(raw: Mapping[str, Any], resolved: Mapping[str, Any]) -> list[str]:
    """The keys given in ``raw`` that ``attribution.method`` does not read, where their resolved value is not the
    default (a default changes nothing in any method, so a stored config reads back without a warning)."""
    used = METHOD_KEYS[resolved["attribution"]["method"]]
    candidates: list[tuple[str, Any, Any]] = []
    composite = raw.get("composite")
    if isinstance(composite, Mapping):
        for key in composite:
            if key == "canonizers":
                candidates.append(("composite.canonizers", resolved["canonizers"], []))
            elif key in DEFAULTS["composite"]:
                candidates.append((f"composite.{key}", resolved["composite"][key], DEFAULTS["composite"][key]))
    if "canonizers" in raw:
        candidates.append(("canonizers", resolved["canonizers"], []))
    output = raw.get("output")
    if isinstance(output, Mapping) and "layers" in output:
        candidates.append(("output.layers", resolved["output"]["layers"], []))
    attribution = raw.get("attribution")
    if isinstance(attribution, Mapping):
        for key in _METHOD_ATTRIBUTION_KEYS:
            if key in attribution:
                candidates.append((f"attribution.{key}", resolved["attribution"][key], DEFAULTS["attribution"][key]))
    return [key for key, value, default in candidates
            if value is not None and value != default and key not in used and key.split(".")[0] not in used]


def _warn_unused(ctx: _Ctx, raw: Mapping[str, Any], resolved: Mapping[str, Any]) -> None:
    """Keys the method does not read are a warning, not an error: one config file often serves several methods
    (compare them by changing attribution.method alone), and ``lrpcli debug`` reads its composite whatever the
    method."""
    keys = unused_keys(raw, resolved)
    if keys:
        method = resolved["attribution"]["method"]
        warnings.warn(f"{ctx.origin(keys[0])}: attribution.method {method} does not use {', '.join(keys)}; "
                      "explain ignores them", ConfigWarning, stacklevel=3)


def _apply_overrides(ctx: _Ctx, raw: dict, overrides: Mapping[str, Any]) -> dict:
    for dotted, value in overrides.items():
        if value is None:
            continue
        parts = str(dotted).split(".")
        if len(parts) == 1 and parts[0] in SECTIONS and not isinstance(DEFAULTS[parts[0]], dict):
            raw[parts[0]] = value
            ctx.overridden.add(dotted)
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS or not isinstance(DEFAULTS[parts[0]], dict):
            raise ConfigError(
                f"command line: {dotted}: unknown override key; expected section.key, e.g. run.batch_size"
            )
        section, key = parts
        allowed = _COMPOSITE_KEYS if section == "composite" else tuple(DEFAULTS[section])
        if key not in allowed:
            ctx.overridden.add(dotted)
            _check_keys(ctx, section, {key: value}, allowed)
        current = raw.get(section)
        if current is None:
            current = {}
        elif not isinstance(current, Mapping):
            ctx.expected(section, "a mapping (key: value lines)", current)
        raw[section] = {**current, key: value}
        ctx.overridden.add(dotted)
    return raw


# --------------------------------------------------------------------------------------------- sections
def _validate_model(ctx: _Ctx, value: Any) -> dict:
    if value is None:
        ctx.fail("model", "missing; set model.name (a torchvision model) or model.entrypoint (pkg.module:fn)")
    given = _mapping(ctx, "model", value)
    _check_keys(ctx, "model", given, tuple(DEFAULTS["model"]))
    out = {**DEFAULTS["model"], **given}
    name = _string(ctx, "model.name", out["name"], nullable=True)
    entry = _string(ctx, "model.entrypoint", out["entrypoint"], nullable=True)
    if (name is None) == (entry is None):
        if name is None:
            ctx.fail("model", "needs exactly one of model.name (a torchvision model) or model.entrypoint")
        ctx.fail("model.entrypoint", f"give model.name or model.entrypoint, not both (name is {show(name)})")
    if entry is not None:
        module_part, _, fn = entry.rpartition(":")
        if not module_part or not fn.isidentifier():
            ctx.fail(
                "model.entrypoint",
                f"expected 'pkg.module:function' or 'path/to/file.py:function', got {show(entry)}",
            )
    out["weights"] = _string(ctx, "model.weights", out["weights"], nullable=True)
    kwargs = _mapping(ctx, "model.kwargs", out["kwargs"])
    return {"name": name, "entrypoint": entry, "weights": out["weights"], "kwargs": kwargs}


def channels(mode: str) -> int:
    """Number of channels of an image mode (RGB: 3, L: 1)."""
    return 3 if mode == "RGB" else 1


def _validate_input(ctx: _Ctx, value: Any) -> dict:
    given = _mapping(ctx, "input", value)
    _check_keys(ctx, "input", given, tuple(DEFAULTS["input"]))
    mode = _choice(ctx, "input.mode", given.get("mode", "RGB"), ("RGB", "L"))
    n = channels(mode)
    out: dict[str, Any] = {}
    for key in ("resize", "crop"):
        out[key] = _integer(
            ctx, f"input.{key}", given.get(key, DEFAULTS["input"][key]), minimum=1, nullable=True
        )
    if out["resize"] is not None and out["crop"] is not None and out["crop"] > out["resize"]:
        ctx.fail("input.crop", f"expected an integer <= input.resize ({out['resize']}), got {out['crop']}")
    defaults = (
        {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        if mode == "RGB"
        else {"mean": GRAY_MEAN, "std": GRAY_STD}
    )
    for key in ("mean", "std"):
        path = f"input.{key}"
        raw = given.get(key, defaults[key])
        what = f"a list of {n} numbers (one per {mode} channel)"
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            raw = [raw] * n
        items = _list(ctx, path, raw, what, nullable=False)
        if len(items) != n:
            ctx.expected(path, what, raw)
        strict = key == "std"
        out[key] = [
            float(_number(ctx, f"{path}[{i}]", v, minimum=0 if strict else None, strict=strict))
            for i, v in enumerate(items)
        ]
    out["mode"] = mode
    return {k: out[k] for k in DEFAULTS["input"]}


def _validate_canonizers(ctx: _Ctx, raw: Mapping, composite_raw: Mapping) -> list[str]:
    if "canonizers" in composite_raw and "canonizers" in raw:
        ctx.fail(
            "composite.canonizers", "canonizers are given twice; keep the top-level canonizers list only"
        )
    path = "composite.canonizers" if "canonizers" in composite_raw else "canonizers"
    value = composite_raw.get("canonizers", raw.get("canonizers"))
    if isinstance(value, str):
        value = [value]
    items = _list(ctx, path, value, "a list of canonizer names")
    known = list(CANONIZER_NAMES)
    out = []
    for i, name in enumerate(items):
        item_path = f"{path}[{i}]"
        _string(ctx, item_path, name)
        if name not in known:
            ctx.fail(
                item_path,
                f"unknown canonizer {show(name)}{did_you_mean(name, known)} (known: {', '.join(known)})",
            )
        if name in out:
            ctx.fail(item_path, f"canonizer {show(name)} is listed twice")
        out.append(name)
    return out


def _bounds_spec(ctx: _Ctx, path: str, value: Any, n: int) -> Any:
    """``auto``, a number, or a list of ``n`` numbers (one per channel)."""
    what = f"auto, a number or a list of {n} numbers (one per channel)"
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, list | tuple):
        if len(value) != n:
            ctx.expected(path, what, value)
        return [float(_number(ctx, f"{path}[{i}]", v)) for i, v in enumerate(value)]
    if isinstance(value, str) and not _NUMBER_RE.match(value):
        ctx.expected(path, what, value)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        ctx.expected(path, what, value)
    return float(_number(ctx, path, value))


def bounds_value(spec: Any, which: str, mean: list[float], std: list[float]) -> Any:
    """A bounds spec as a float (scalar) or a list of floats per channel; ``auto`` from mean/std."""
    if spec == "auto":
        pixel = 0.0 if which == "low" else 1.0
        return [(pixel - m) / s for m, s in zip(mean, std)]
    return spec


def _check_low_high(ctx: _Ctx, path_low: str, path_high: str, low: Any, high: Any, inp: Mapping) -> None:
    lo = bounds_value(low, "low", inp["mean"], inp["std"])
    hi = bounds_value(high, "high", inp["mean"], inp["std"])
    n = len(inp["mean"])
    los = lo if isinstance(lo, list) else [lo] * n
    his = hi if isinstance(hi, list) else [hi] * n
    for i, (a, b) in enumerate(zip(los, his)):
        if not a < b:
            where = "" if not isinstance(lo, list) and not isinstance(hi, list) else f" (channel {i})"
            ctx.fail(path_high, f"expected a value above {path_low} ({a:g}){where}, got {show(high)} ({b:g})")


def _stabilizer(ctx: _Ctx, path: str, value: Any, default: Mapping) -> dict:
    if isinstance(value, int | float | str) and not isinstance(value, bool) and _is_number(value):
        value = {"epsilon": value}
    given = _mapping(ctx, path, value)
    _check_keys(ctx, path, given, ("epsilon", "mode"))
    eps = _number(ctx, f"{path}.epsilon", given.get("epsilon", default["epsilon"]), minimum=0, strict=True)
    mode = _choice(ctx, f"{path}.mode", given.get("mode", default["mode"]), STABILIZER_MODES)
    return {"epsilon": float(eps), "mode": mode}


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, str) and bool(_NUMBER_RE.match(value))


def _zero_params(ctx: _Ctx, path: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    items = _list(ctx, path, value, f"a list of parameter names from: {', '.join(ZERO_PARAMS)}")
    out = []
    for i, v in enumerate(items):
        choice = _choice(ctx, f"{path}[{i}]", v, ZERO_PARAMS)
        if choice not in out:
            out.append(choice)
    return out


# Composite parameters in the config; a composite that does not use one gets null (given: an error).
COMPOSITE_PARAMS = tuple(PARAMS)


def _validate_composite(ctx: _Ctx, given: dict, inp: Mapping) -> dict:
    _check_keys(ctx, "composite", given, _COMPOSITE_KEYS)
    d = DEFAULTS["composite"]
    out: dict[str, Any] = {}
    name = _string(ctx, "composite.name", given.get("name", d["name"]))
    known = sorted(COMPOSITES)
    if name not in known:
        ctx.fail(
            "composite.name",
            f"unknown composite {show(name)}{did_you_mean(name, known)} (known: {', '.join(known)})",
        )
    out["name"] = name
    used = COMPOSITES[name].params
    for key in COMPOSITE_PARAMS:
        if key not in used and given.get(key) is not None:
            ctx.fail(
                f"composite.{key}",
                f"composite {name!r} does not use {key} (got {show(given[key])}); remove it "
                f"(its parameters: {', '.join(p for p in COMPOSITE_PARAMS if p in used) or 'none'})",
            )

    def value(key: str) -> Any:
        return d[key] if given.get(key) is None else given[key]

    n = len(inp["mean"])
    out["epsilon"] = float(_number(ctx, "composite.epsilon", value("epsilon"), minimum=0, strict=True))
    out["gamma"] = float(_number(ctx, "composite.gamma", value("gamma"), minimum=0))
    out["low"] = _bounds_spec(ctx, "composite.low", value("low"), n)
    out["high"] = _bounds_spec(ctx, "composite.high", value("high"), n)
    _check_low_high(ctx, "composite.low", "composite.high", out["low"], out["high"], inp)
    out["zero_params"] = _zero_params(ctx, "composite.zero_params", value("zero_params"))
    out["stabilizer"] = _stabilizer(ctx, "composite.stabilizer", given.get("stabilizer"), d["stabilizer"])
    out["maxpool"] = _choice(ctx, "composite.maxpool", value("maxpool"), MAXPOOL_MODES)
    out["beta"] = float(_number(ctx, "composite.beta", value("beta"), minimum=0, strict=True))
    for key in COMPOSITE_PARAMS:
        if key not in used:
            out[key] = None
    out["rules"] = _validate_rules(ctx, given.get("rules"), out, inp)
    out["strict"] = _boolean(ctx, "composite.strict", value("strict"))
    return {k: out[k] for k in d}


# ---------------------------------------------------------------------------------------------- rules
_RULE_ITEM_KEYS = ("match", "type", "rule")


def check_rules(source: str, value: Any, comp: Mapping, inp: Mapping, *, prefix: str, offset: int = 0
                ) -> list[dict]:
    """``composite.rules`` items (or the Python API's overrides, under ``prefix``) validated as in a config."""
    return _validate_rules(_Ctx(source), value, comp, inp, prefix, offset)


def check_rule_spec(source: str, path: str, spec: Any, comp: Mapping, inp: Mapping) -> Any:
    """One rule spec (a name or ``{name: ..., param: value}``) validated as in a config."""
    return _validate_rule_spec(_Ctx(source), path, spec, comp, inp)


def _validate_rules(ctx: _Ctx, value: Any, comp: Mapping, inp: Mapping, prefix: str = "composite.rules",
                    offset: int = 0) -> list[dict]:
    items = _list(ctx, prefix, value, "a list of {match: glob, rule: ...} or {type: Class, rule: ...}")
    out = []
    for i, item in enumerate(items):
        path = f"{prefix}[{i + offset}]"
        if not isinstance(item, Mapping):
            ctx.expected(
                path,
                "a mapping like {match: 'features.0', rule: zbox} or {type: Linear, rule: epsilon}",
                item,
            )
        _check_keys(ctx, path, item, _RULE_ITEM_KEYS)
        if ("match" in item) == ("type" in item):
            ctx.fail(
                path,
                f"needs exactly one of match (a module-name glob) or type (a module class), got {show(item)}",
            )
        entry: dict[str, Any] = {}
        if "match" in item:
            entry["match"] = _string(ctx, f"{path}.match", item["match"])
        else:
            entry["type"] = _string(ctx, f"{path}.type", item["type"])
        if "rule" not in item:
            ctx.fail(
                f"{path}.rule", "missing; give a rule name (e.g. epsilon) or {name: epsilon, epsilon: 0.25}"
            )
        entry["rule"] = _validate_rule_spec(ctx, f"{path}.rule", item["rule"], comp, inp)
        out.append(entry)
    return out


def _validate_rule_spec(ctx: _Ctx, path: str, spec: Any, comp: Mapping, inp: Mapping) -> Any:
    """A rule name or ``{name: ..., **params}``; what the rule itself refuses is checked in ``lrpcli.build``."""
    if isinstance(spec, str):
        name, params, name_path = spec, {}, path
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            ctx.fail(f"{path}.name", f"missing; a rule mapping needs a name, got {show(spec)}")
        name, params, name_path = spec["name"], {k: v for k, v in spec.items() if k != "name"}, f"{path}.name"
    else:
        ctx.expected(path, "a rule name or a mapping {name: ..., param: value}", spec)
    name = _string(ctx, name_path, name)
    for key in params:
        if not isinstance(key, str):
            ctx.fail(f"{path}.{key}", f"parameter names must be strings, got {show(key)}")
    checked: dict[str, Any] = {}
    n = len(inp["mean"])
    for key, value in params.items():
        p = f"{path}.{key}"
        if key == "epsilon":
            checked[key] = float(_number(ctx, p, value, minimum=0, strict=True))
        elif key in ("gamma", "alpha", "beta"):
            checked[key] = float(_number(ctx, p, value, minimum=0))
        elif key in ("low", "high"):
            checked[key] = _bounds_spec(ctx, p, value, n)
        elif key == "stabilizer":
            checked[key] = _stabilizer(
                ctx, p, value, comp["stabilizer"] or DEFAULTS["composite"]["stabilizer"]
            )
        elif key == "zero_params":
            checked[key] = _zero_params(ctx, p, value)
        else:
            checked[key] = _deepcopy(value)
    if "low" in checked or "high" in checked:
        _check_low_high(
            ctx,
            f"{path}.low",
            f"{path}.high",
            checked.get("low", comp["low"] or "auto"),
            checked.get("high", comp["high"] or "auto"),
            inp,
        )
    key = RULE_ALIASES.get(name.lower(), name.lower())
    if key not in RULE_NAMES:
        ctx.fail(name_path, f"unknown rule {show(name)}{did_you_mean(name.lower(), RULE_NAMES)} "
                            f"(known: {', '.join(RULE_NAMES)})")
    return key if isinstance(spec, str) else {"name": key, **checked}


# ------------------------------------------------------------------------------------ other sections
def _validate_attribution(ctx: _Ctx, value: Any) -> dict:
    given = _mapping(ctx, "attribution", value)
    d = DEFAULTS["attribution"]
    _check_keys(ctx, "attribution", given, tuple(d))
    out: dict[str, Any] = {}
    out["method"] = _choice(ctx, "attribution.method", given.get("method", d["method"]), METHODS)
    target = given.get("target", d["target"])
    if isinstance(target, str) and target.strip().lower() in ("label", "prediction"):
        out["target"] = target.strip().lower()
    elif isinstance(target, int) and not isinstance(target, bool) and target >= 0:
        out["target"] = target
    else:
        ctx.expected("attribution.target", "label, prediction or a class index >= 0", target)
    out["noise_level"] = float(
        _number(ctx, "attribution.noise_level", given.get("noise_level", d["noise_level"]), minimum=0)
    )
    out["n_iter"] = _integer(ctx, "attribution.n_iter", given.get("n_iter", d["n_iter"]), minimum=1)
    baseline = given.get("baseline", d["baseline"])
    if _is_number(baseline):
        out["baseline"] = float(_number(ctx, "attribution.baseline", baseline))
    elif isinstance(baseline, str) and baseline.strip().lower() in BASELINES:
        out["baseline"] = baseline.strip().lower()
    else:
        ctx.expected("attribution.baseline", f"one of {', '.join(BASELINES)} or a number", baseline)
    for key in ("window", "stride"):
        path = f"attribution.{key}"
        raw = given.get(key, d[key])
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = [raw, raw]
        items = _list(ctx, path, raw, "an integer >= 1 or a list of 2 (height, width)", nullable=False)
        if len(items) != 2:
            ctx.expected(path, "an integer >= 1 or a list of 2 (height, width)", raw)
        out[key] = [_integer(ctx, f"{path}[{i}]", v, minimum=1) for i, v in enumerate(items)]
    out["fill"] = float(_number(ctx, "attribution.fill", given.get("fill", d["fill"])))
    return {k: out[k] for k in d}


#: The largest ``run.seed``: torch generators take 64-bit seeds, and the seed is stored as a signed 64-bit int.
MAX_SEED = 2**63 - 1
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _validate_run(ctx: _Ctx, value: Any) -> dict:
    given = _mapping(ctx, "run", value)
    d = DEFAULTS["run"]
    _check_keys(ctx, "run", given, tuple(d))
    out: dict[str, Any] = {}
    out["batch_size"] = _integer(ctx, "run.batch_size", given.get("batch_size", d["batch_size"]), minimum=1)
    workers = given.get("num_workers", d["num_workers"])
    if isinstance(workers, str) and workers.strip().lower() == "auto":
        out["num_workers"] = "auto"
    else:
        if isinstance(workers, float) and workers.is_integer():
            workers = int(workers)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            ctx.expected("run.num_workers", "auto or an integer >= 0", workers)
        out["num_workers"] = workers
    device = given.get("device", d["device"])
    if not isinstance(device, str) or not _DEVICE_RE.match(device.strip().lower()):
        ctx.expected("run.device", "auto, cpu, cuda or cuda:N", device)
    out["device"] = device.strip().lower()
    out["max_samples"] = _integer(
        ctx, "run.max_samples", given.get("max_samples", d["max_samples"]), minimum=1, nullable=True
    )
    out["seed"] = _integer(ctx, "run.seed", given.get("seed", d["seed"]), minimum=0, maximum=MAX_SEED)
    return {k: out[k] for k in d}


def _validate_output(ctx: _Ctx, value: Any) -> dict:
    given = _mapping(ctx, "output", value)
    d = DEFAULTS["output"]
    _check_keys(ctx, "output", given, tuple(d))
    out: dict[str, Any] = {}
    out["path"] = str(_string(ctx, "output.path", given.get("path", d["path"])))
    out["dtype"] = _choice(ctx, "output.dtype", given.get("dtype", d["dtype"]), ("float32", "float16"))
    out["store_input"] = _boolean(ctx, "output.store_input", given.get("store_input", d["store_input"]))
    layers = given.get("layers", d["layers"])
    if isinstance(layers, str):
        layers = [layers]
    items = _list(ctx, "output.layers", layers, "a list of module-name globs (e.g. layer4, features.*)")
    out["layers"] = [_string(ctx, f"output.layers[{i}]", v) for i, v in enumerate(items)]
    out["compression"] = _choice(ctx, "output.compression", given.get("compression", d["compression"]),
                                 COMPRESSIONS)
    return {k: out[k] for k in d}


def resolve_path(path: str | Path, base_dir: str | Path | None) -> Path | None:
    """A user path: as is when absolute, else against the config's directory first, then the current one."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    for root in ([Path(base_dir)] if base_dir is not None else []) + [Path.cwd()]:
        candidate = root / p
        if candidate.exists():
            return candidate
    return None


def matches(name: str, pattern: str) -> bool:
    """Module-name glob matching used for ``composite.rules[].match`` and ``output.layers``."""
    return fnmatch.fnmatchcase(name, pattern)

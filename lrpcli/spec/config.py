"""Load, validate and resolve an ``lrpcli`` YAML config into a frozen :class:`Config`.

The schema is ``lrpcli.spec.schema`` (pydantic models); this module reads the file, applies command-line overrides and
turns the first validation error into one :class:`~lrpcli.errors.ConfigError` line that names the file (or
``command line`` for an override), the dotted key path, the value at fault and what is allowed, so a user never
sees a traceback for a typo. ``Config.to_yaml()`` is stored with the results and reads back to an equal config.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import ValidationError

from lrpcli.errors import ConfigError, ConfigWarning
from lrpcli.spec.schema import NO_CHECKS, EngineChecks, Spec, channels, rule_items, rule_spec, unknown_key
from lrpcli.spec.values import Bad, at, did_you_mean, plain, show
from lrpcli.spec.yamlfile import MAX_DEPTH, read_yaml

# channels, did_you_mean and show are re-exported for lrpcli.explainer.models.
__all__ = ["Config", "read_config", "validate", "check_rules", "check_rule_spec", "resolve_path",
           "channels", "show", "did_you_mean", "unused_keys", "DEFAULTS", "SECTIONS"]

#: The resolved defaults (model.name/entrypoint have none: exactly one is required); order = output order.
DEFAULTS: dict[str, Any] = {name: [] if name == "canonizers" else field.annotation.model_construct().model_dump()
                            for name, field in Spec.model_fields.items()}
SECTIONS = tuple(DEFAULTS)


def _allowed(section: str) -> tuple[str, ...]:
    """The keys of ``section`` (of the top level for ``""``); ``canonizers`` may also be written in ``composite``
    (it is resolved to the top level)."""
    if not section:
        return SECTIONS
    return (*DEFAULTS["composite"], "canonizers") if section == "composite" else tuple(DEFAULTS[section])


class Config(Mapping):
    """A frozen, resolved config: attribute and item access, ``to_dict()``, ``to_yaml()``.

    Nested mappings are Configs too (``config.model.name``) and lists are tuples, so nothing can change a
    validated value. Each remembers ``source`` (the file as the user named it, at the start of error messages),
    ``base_dir`` (the file's folder, where relative model paths are looked up first) and ``prefix`` (its dotted
    path, ``"model."``), so code that only gets ``config.model`` can still name the file and key in its errors.
    """

    __slots__ = ("_data", "source", "base_dir", "prefix")

    def __init__(self, data: Mapping, source: str = "config", base_dir: str | Path = ".", prefix: str = "") -> None:
        object.__setattr__(self, "_data", dict(data))
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "base_dir", Path(base_dir))
        object.__setattr__(self, "prefix", prefix)

    def __getitem__(self, key: str) -> Any:
        return self._wrap(self._data[key], f"{self.prefix}{key}")

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
            raise AttributeError(f"{self.prefix.rstrip('.') or 'config'} has no key {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> NoReturn:
        raise AttributeError("Config is frozen; use load_config(..., overrides=...) to change values")

    def __delattr__(self, key: str) -> NoReturn:
        raise AttributeError("Config is frozen")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self._data == (other._data if isinstance(other, Config) else dict(other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Config({self._data!r})"

    def __reduce__(self) -> tuple:
        return Config, (self._data, self.source, self.base_dir, self.prefix)

    def _wrap(self, value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return Config(value, self.source, self.base_dir, path + ".")
        if isinstance(value, list):
            return tuple(self._wrap(v, f"{path}[{i}]") for i, v in enumerate(value))
        return value

    def to_dict(self) -> dict[str, Any]:
        """A deep, plain-Python copy (defaults filled), safe to modify."""
        return plain(self._data)

    def to_yaml(self) -> str:
        """The resolved config as YAML; ``load_config`` reads it back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError for ``key`` of this section, in the usual ``file: key.path: message`` form."""
        return ConfigError(f"{self.source}: {self.prefix}{key}: {message}")


# ------------------------------------------------------------------------------------------ entry points
def read_config(path: str | Path, overrides: Mapping[str, Any] | None = None,
                checks: EngineChecks = NO_CHECKS) -> Config:
    """Read, validate and resolve a config file; ``overrides`` are dotted keys from command-line options.

    Names are checked against ``lrpcli.catalogue``; ``checks`` adds what needs the engine (the torchvision model,
    module classes, a rule's own parameter checks: ``lrpcli.explainer.build.load_config`` passes them). Override
    values of ``None`` are ignored (an option that was not given); the others are validated exactly like file
    values, and their errors say ``command line`` instead of the file name.
    """
    label = str(path)
    raw = read_yaml(Path(path), label)
    if raw is None:
        raise ConfigError(f"{label}: the config is empty; it needs at least model.name or model.entrypoint")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{label}: expected a mapping of sections (model, input, ...), got {show(raw)}")
    return validate(raw, source=label, base_dir=Path(path).resolve().parent, overrides=overrides, checks=checks)


def validate(raw: Mapping[str, Any], *, source: str = "config", base_dir: str | Path = ".",
             overrides: Mapping[str, Any] | None = None, checks: EngineChecks = NO_CHECKS) -> Config:
    """Validate an already-parsed config mapping (what ``read_config`` does after reading the YAML)."""
    try:
        raw = plain(raw)
    except RecursionError:  # a mapping built in Python (files are bounded by MAX_DEPTH when read)
        raise ConfigError(f"{source}: nested too deeply (at most {MAX_DEPTH} levels)") from None
    origin = _Origin(source)
    if overrides:
        raw = _apply_overrides(origin, raw, overrides)
    try:
        resolved = Spec.model_validate(raw, context={"checks": checks}).model_dump()
    except ValidationError as err:
        origin.fail(*_first_error(err))
    _warn_unused(origin, raw, resolved)
    return Config(resolved, source=source, base_dir=base_dir)


class _Origin:
    """Where values came from: errors on overridden keys say ``command line`` instead of the file."""

    def __init__(self, source: str) -> None:
        self.source, self.overridden = source, set[str]()

    def __call__(self, path: str) -> str:
        given = any(path == key or path.startswith((f"{key}.", f"{key}[")) for key in self.overridden)
        return "command line" if given else self.source

    def fail(self, path: str, message: str) -> NoReturn:
        raise ConfigError(f"{self(path)}: {path}: {message}")


def _first_error(err: ValidationError) -> tuple[str, str]:
    """The key path and message of the error to report: unknown keys first (as a reader checks the keys of a
    section before its values), then the first value in output order."""
    error = min(err.errors(), key=lambda e: e["type"] not in ("extra_forbidden", "invalid_key"))
    loc = [str(part) for part in error["loc"]]
    path = ".".join(loc)
    if error["type"] in ("extra_forbidden", "invalid_key"):
        parent = ".".join(loc[:-1])
        return path, unknown_key(error["loc"][-1], _allowed(parent), parent)
    bad = (error.get("ctx") or {}).get("error")
    if not isinstance(bad, Bad):
        return path, f"{error['msg']}, got {show(error['input'])}"
    path = (path + bad.sub).lstrip(".")
    return path, _placed(bad.message, path)


def _placed(message: str, path: str) -> str:
    """``<at>`` in a message names a sibling of the key at fault: ``<at>low`` at ``composite.high``."""
    return message.replace("<at>", path.rpartition(".")[0] + ".")


def _fail_at(source: str, prefix: str, check: Any, *args: Any) -> Any:
    try:
        return at(prefix, check, *args)
    except Bad as err:
        raise ConfigError(f"{source}: {err.sub}: {_placed(err.message, err.sub)}") from None


def check_rules(source: str, value: Any, comp: Mapping, inp: Mapping, checks: EngineChecks, *, prefix: str,
                offset: int = 0) -> list[dict]:
    """``composite.rules`` items (or the Python API's overrides, under ``prefix``) validated as in a config."""
    return _fail_at(source, prefix, rule_items, value, comp, inp, checks, offset)


def check_rule_spec(source: str, path: str, spec: Any, comp: Mapping, inp: Mapping, checks: EngineChecks) -> Any:
    """One rule spec (a name or ``{name: ..., param: value}``) validated as in a config."""
    return _fail_at(source, path, rule_spec, spec, comp, inp, checks)


def _apply_overrides(origin: _Origin, raw: dict, overrides: Mapping[str, Any]) -> dict:
    for dotted, value in overrides.items():
        if value is None:
            continue
        parts = str(dotted).split(".")
        if len(parts) == 1 and parts[0] in SECTIONS and not isinstance(DEFAULTS[parts[0]], dict):
            raw[parts[0]] = value
            origin.overridden.add(dotted)
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS or not isinstance(DEFAULTS[parts[0]], dict):
            raise ConfigError(f"command line: {dotted}: unknown override key; expected section.key, "
                              "e.g. run.batch_size")
        section, key = parts
        origin.overridden.add(dotted)
        if key not in _allowed(section):
            origin.fail(dotted, unknown_key(key, _allowed(section), section))
        current = raw.get(section)
        if current is not None and not isinstance(current, Mapping):
            origin.fail(section, f"expected a mapping (key: value lines), got {show(current)}")
        raw[section] = {**(current or {}), key: value}
    return raw


#: The keys only some attribution methods read, by key path or section, and which (every method reads the others).
READ_BY: dict[str, tuple[str, ...]] = {
    "composite": ("lrp",), "canonizers": ("lrp",), "output.layers": ("lrp",),
    "attribution.noise_level": ("smoothgrad",), "attribution.n_iter": ("smoothgrad", "integrated_gradients"),
    "attribution.baseline": ("integrated_gradients",), "attribution.window": ("occlusion",),
    "attribution.stride": ("occlusion",), "attribution.fill": ("occlusion",)}


def unused_keys(raw: Mapping[str, Any], resolved: Mapping[str, Any]) -> list[str]:
    """The keys given in ``raw`` that ``attribution.method`` does not read, where their resolved value is not the
    default (a default changes nothing in any method, so a stored config reads back without a warning)."""
    def given(section: str) -> Mapping:
        return raw[section] if isinstance(raw.get(section), Mapping) else {}

    def unused(path: str) -> bool:
        section, _, key = path.partition(".")
        read_by = READ_BY.get(path, READ_BY.get(section, (method,)))
        canonizers = key in ("", "canonizers")  # composite.canonizers is the top-level list
        value = resolved["canonizers"] if canonizers else resolved[section][key]
        return method not in read_by and value is not None and value != ([] if canonizers else DEFAULTS[section][key])

    method = resolved["attribution"]["method"]
    paths = [f"composite.{key}" for key in given("composite")] + ["canonizers"] * ("canonizers" in raw)
    paths += [f"{section}.{key}" for section in ("output", "attribution") for key in DEFAULTS[section]
              if key in given(section)]
    return [path for path in paths if unused(path)]


def _warn_unused(origin: _Origin, raw: Mapping[str, Any], resolved: Mapping[str, Any]) -> None:
    """Keys the method does not read are a warning, not an error: one config file often serves several methods
    (compare them by changing attribution.method alone), and ``lrpcli debug`` reads its composite whatever the
    method."""
    keys = unused_keys(raw, resolved)
    if keys:
        method = resolved["attribution"]["method"]
        warnings.warn(f"{origin(keys[0])}: attribution.method {method} does not use {', '.join(keys)}; "
                      "explain ignores them", ConfigWarning, stacklevel=3)


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


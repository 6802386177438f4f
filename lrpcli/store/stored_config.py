"""The run's config as a result file stores it, and the comparison a resume makes against it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lrpcli.spec.config import Config, resolve_path

#: Config keys that do not change the numbers in the file: a resume may change them freely.
IGNORED_CONFIG_KEYS = frozenset({"run.num_workers", "run.batch_size", "output.path", "run.device", "run.threads",
                                 "output.compression"})


def _absolute(value: str, base_dir: str | os.PathLike) -> str | None:
    """``value`` as an absolute, resolved path when it names an existing file (as the model loader finds it)."""
    found = resolve_path(value, base_dir)
    return str(found.resolve()) if found is not None else None


def file_config(config: Config) -> dict[str, Any]:
    """The config as a result file stores it: ``config.to_dict()`` with absolute model file paths.

    ``model.entrypoint`` (``path/to/file.py:function``) and ``model.weights`` (a file) are looked up as the
    model loader does (the config file's folder first, then the current one) and written as absolute paths,
    so that the model can be rebuilt from the file alone, from any folder. Module entrypoints
    (``pkg.module:function``), torchvision weight names and paths that name no file stay as written. A resume
    compares this form, so the same config given from another working folder is the same config.
    """
    out = config.to_dict()
    model = out.get("model")
    if not isinstance(model, dict):
        return out
    base_dir = Path(config.base_dir)
    entry = model.get("entrypoint")
    if isinstance(entry, str) and ":" in entry:
        target, _, fn = entry.rpartition(":")
        if target.endswith(".py") or "/" in target or "\\" in target:
            found = _absolute(target, base_dir)
            if found is not None:
                model["entrypoint"] = f"{found}:{fn}"
    weights = model.get("weights")
    if isinstance(weights, str):
        model["weights"] = _absolute(weights, base_dir) or weights
    return out


def config_yaml(config: Mapping[str, Any]) -> str:
    """A stored config's YAML text (the layout of ``Config.to_yaml``)."""
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None, allow_unicode=True)


def _normalise(value: Any) -> Any:
    """Tuples, paths and numpy scalars as YAML would give them back."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if a == b:
        return True
    try:  # PyYAML reads '1e-6' as a string; the config loader reads it as a number
        return isinstance(a, (int, float, str)) and isinstance(b, (int, float, str)) and float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _show(value: Any, limit: int = 80) -> str:
    """A value as JSON, at most ``limit`` characters; a long string keeps its end (where two paths differ)."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return text[: limit // 2 - 2] + "..." + text[-(limit - limit // 2 - 1):]
    return text[: limit - 3] + "..."


def config_differences(stored: Any, current: Any, ignore: frozenset[str] = IGNORED_CONFIG_KEYS) -> list[str]:
    """Dotted key paths whose values differ, as 'key: A in the file, B now' (ignored keys skipped)."""
    out: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if key in ignore:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                sub = f"{key}.{k}" if key else str(k)
                if sub in ignore:
                    continue
                if k not in a and isinstance(b[k], dict):
                    walk({}, b[k], sub)  # one line per key, and ignored keys stay ignored
                elif k not in b and isinstance(a[k], dict):
                    walk(a[k], {}, sub)
                elif k not in a:
                    out.append(f"{sub}: absent in the file, {_show(b[k])} now")
                elif k not in b:
                    out.append(f"{sub}: {_show(a[k])} in the file, absent now")
                else:
                    walk(a[k], b[k], sub)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{key}[{i}]")
        elif not _same(a, b):
            out.append(f"{key or '(config)'}: {_show(a)} in the file, {_show(b)} now")

    walk(_normalise(stored), _normalise(current), "")
    return out

"""Reading a YAML config file safely: duplicate keys, alias bombs and deep nesting are one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lrpcli.errors import ConfigError

__all__ = ["read_yaml", "MAX_CONFIG_BYTES", "MAX_DEPTH", "MAX_NODES"]

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
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
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
                    None, None, f"duplicate key {key!r} (first on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        except TypeError:  # unhashable key: let PyYAML report it
            pass
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path, label: str) -> Any:
    """The document of a YAML file, every problem (missing, too large, not UTF-8, bad YAML) a ConfigError line."""
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

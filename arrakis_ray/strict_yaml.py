"""Pipeline files parsed strictly: UTF-8, no anchors or aliases, no key given twice,
and every YAML error in one line naming the file and the line (``config.py`` then checks
the values field by field)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from arrakis_ray.errors import ConfigError


class _PipelineLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases as it composes, before any expansion.

    Refused outright rather than capped: a pipeline file is a short hand-written config
    with no need for them, while a 731-byte nest of aliases ("billion laughs") expands
    to gigabytes in whatever walks the result (a cap would have to guard every walk).
    Composing meets each anchor and alias as one event: nothing is ever expanded.
    """

    def compose_node(self, parent, index):
        event = self.peek_event()
        name = getattr(event, "anchor", None)  # set on an anchored node and on an alias
        if name is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise ConfigError(
                f"{self.name}:{event.start_mark.line + 1}: YAML {sign}{name}: anchors and "
                "aliases are not allowed in a pipeline file; write the value out"
            )
        return super().compose_node(parent, index)


def read_strict_yaml(path: Path) -> Any:
    """A pipeline file parsed strictly: UTF-8, no anchors or aliases, no key twice."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset "
            f"{exc.start})"
        ) from None
    loader = _PipelineLoader(text)
    loader.name = str(path)  # the file its errors name (PyYAML's own marks too)
    try:
        node = loader.get_single_node()
        if node is None:  # an empty file
            return None
        _refuse_duplicate_keys(node, path, "")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(path, exc)) from None
    except RecursionError:
        raise ConfigError(f"{path}: not a pipeline file: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: Path, where: str) -> None:
    """Refuse a mapping that gives a key twice (plain YAML keeps the last one silently).

    Walks the composed nodes, before construction; aliases were refused when composing,
    so the nodes form a tree and the walk is linear in the file's size.
    """
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{where}[{i}]")
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}  # (tag, text) of a key -> its line
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):  # a list or mapping: construction refuses
                continue
            line, name = key.start_mark.line + 1, f"{where}.{key.value}" if where else key.value
            if (key.tag, key.value) in first_line:
                raise ConfigError(
                    f"{path}: {name}: key given twice (lines "
                    f"{first_line[key.tag, key.value]} and {line}); keep one"
                )
            first_line[key.tag, key.value] = line
            _refuse_duplicate_keys(value, path, name)


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line from PyYAML's multi-line message: file, line, problem, context."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{problem} ({context})" if context else problem
    return f"{where}: not valid YAML: {' '.join(text.split())}"

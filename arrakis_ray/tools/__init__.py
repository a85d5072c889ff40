"""Analysis tools. ``TOOLS`` maps a name to its class; ``register_tool`` adds your own.

An explicit dict, not a metaclass registry: reading this file tells you every tool.
"""

from __future__ import annotations

from arrakis_ray.tools.base import ShardInputs, Tool
from arrakis_ray.tools.logit_lens import LogitLens

TOOLS: dict[str, type[Tool]] = {
    LogitLens.name: LogitLens,
}


def register_tool(cls: type[Tool]) -> type[Tool]:
    """Make a user-defined tool available by name (usable as a class decorator)."""
    TOOLS[cls.name] = cls
    return cls


__all__ = ["TOOLS", "ShardInputs", "Tool", "register_tool"]

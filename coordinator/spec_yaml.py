"""Reading a submitted spec's YAML within bounds: size, alias expansion and nesting depth.

A spec is a few hundred bytes (a few kB with an inline schema). The limits bound what a
submitted spec can cost the process hosting the federation: its size, how far YAML aliases
may expand it (a "billion laughs" document is a few hundred bytes and expands to gigabytes),
and how deep it nests.
"""

from __future__ import annotations

from typing import Any

import yaml

from fedimg_core.config import PROBLEM_CHARS
from fedimg_core.errors import ConfigError

__all__ = ["MAX_SPEC_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "read_spec_yaml"]

MAX_SPEC_BYTES = 64 * 1024
MAX_YAML_NODES = 20_000  # after alias expansion
MAX_YAML_DEPTH = 32  # nested mappings/lists (a spec needs 4-5)


class _TooLarge(yaml.YAMLError):
    """The document is larger or deeper than a spec may be."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents whose aliases expand past MAX_YAML_NODES nodes
    (a "billion laughs" spec is a few hundred bytes and expands to gigabytes)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Raise _TooLarge when ``root`` nests deeper than MAX_YAML_DEPTH or expands past MAX_YAML_NODES values."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node, depth: int = 1) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise yaml.YAMLError("a YAML alias refers to a node that contains it (recursive document)")
        if depth > MAX_YAML_DEPTH:
            raise _TooLarge(f"is nested more than {MAX_YAML_DEPTH} levels deep (a spec needs a few)")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        if total > MAX_YAML_NODES:
            raise _TooLarge(f"has more than {MAX_YAML_NODES} values once YAML aliases are expanded (a spec has a few hundred)")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def read_spec_yaml(text: str, where: str, *, error: type[ConfigError] = ConfigError) -> Any:
    """Parse spec text with `yaml.SafeLoader`, within the bounds above.

    Args:
        text: the YAML text.
        where: what to call the spec in messages.
        error: the ConfigError subclass to raise.

    Returns:
        The parsed document.

    Raises:
        ConfigError: (or ``error``) too large, too deep, or not YAML; the message quotes at
            most PROBLEM_CHARS characters of the parser's complaint.
    """
    size = len(text.encode("utf-8", "replace"))
    if size > MAX_SPEC_BYTES:
        raise error(f"{where}: {size} bytes; a spec is at most {MAX_SPEC_BYTES} bytes (a schema inlined in it is a few kB)", file=where)
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except _TooLarge as exc:
        raise error(f"{where}: {exc}", file=where) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise error(f"{where}: is nested more than {MAX_YAML_DEPTH} levels deep (a spec needs a few)", file=where) from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        if len(detail) > PROBLEM_CHARS:
            detail = detail[: PROBLEM_CHARS - 3] + "..."
        raise error(f"{where}: not valid YAML ({detail})", file=where) from None

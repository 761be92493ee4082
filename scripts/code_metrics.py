"""Count the code-shape numbers issue 18 tracks, for any checkout: `python scripts/code_metrics.py [ROOT] [--validators]`.

What is counted (source packages and scripts; tests and benchmarks are not):
- validators: hand-written config validators, found by what a function does, not by its name
  (`config_validator_keys`): a function that raises and reports a problem (``raise``, or
  ``problems.append/add(...)``) from an ``if`` that checks a mapping's value's type by hand
  (``isinstance``/``type``) or refuses unknown keys (``key not in ALLOWED``), about a
  lower-case key read from the mapping (``cfg["rounds"]``, ``cfg.get("rounds")``,
  ``"rounds" in cfg``, a name bound from such a read, the key of a loop over ``cfg.items()``);
  counted when it checks two keys or more, or reads the key it checks from a parameter
  (``_number(problems, cfg, key)``, ``getattr(self, key)``: a per-key helper). Pydantic
  models and their field types are not counted; nor are file-format, integrity and runtime
  checks, which test DICOM keywords, digests or arrays rather than a mapping's keys. A helper
  that checks only a value (``_check_prob(value)``) is not counted on its own (nothing tells
  it from a runtime argument check). ``validator_named_functions`` keeps the earlier,
  name-based count (name starts with validate/check/require/ensure or is a number/type
  checker such as ``_num``; raises). ``--validators`` lists the counted functions;
- did-you-mean sites: calls of ``difflib.get_close_matches``;
- HTML writers: modules whose string literals start an HTML document (``<!DOCTYPE html``/``<html``);
- function-level imports: ``import`` statements inside a function body;
- files over 500 lines, listed;
- public symbols without a docstring: public module-level functions and classes, and public
  methods of public classes.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

HTML_STARTS = ("<!doctype" + " html", "<" + "html")  # split so this file does not count itself
PACKAGES = ("fedimg_core", "fedimg_testing", "preprocessing", "pipelines", "site_agent", "coordinator", "scripts")
VALIDATOR_NAME = re.compile(r"^_?(validate|check|require|ensure)|^_?(num|int|float|bool|positive|nonneg|non_negative|positive_int|number|str|string)(_|$)")


def _source_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for pkg in PACKAGES:
        base = root / pkg
        if base.is_dir():
            files.extend(p for p in sorted(base.rglob("*.py")) if "__pycache__" not in p.parts)
    return files


def _raises(fn: ast.AST) -> bool:
    return any(isinstance(node, ast.Raise) for node in ast.walk(fn))


CONFIG_KEY = re.compile(r"^[a-z][a-z0-9_]*$")  # config keys are lower snake_case (not DICOM keywords, headers, env vars)
REPORTS = re.compile(r"problem|error|fail|bad|refuse", re.IGNORECASE)
ANY_KEY, KEY_PARAMETER = "<any key>", "<key parameter>"


def _own_nodes(nodes: list[ast.stmt] | list[ast.expr]) -> list[ast.AST]:
    """The nodes under ``nodes``, not descending into nested functions, lambdas or classes."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = list(nodes)
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(c for c in ast.iter_child_nodes(node) if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)))
    return out


def _key_read(node: ast.AST, params: set[str]) -> str | None:
    """The key a node reads from a mapping: ``m["k"]``/``m.get("k")`` -> ``k``; ``cfg[key]`` with both parameters -> KEY_PARAMETER."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2:
        # a settings object's attribute named by a parameter: ``getattr(self, key)`` in a per-key helper
        name = node.args[1]
        return KEY_PARAMETER if isinstance(name, ast.Name) and name.id in params else None
    if isinstance(node, ast.Subscript):
        mapping, key = node.value, node.slice
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop") and node.args:
        mapping, key = node.func.value, node.args[0]
    else:
        return None
    if isinstance(key, ast.Constant) and isinstance(key.value, str):
        return key.value
    if isinstance(key, ast.Name) and key.id in params and isinstance(mapping, ast.Name) and mapping.id in params:
        return KEY_PARAMETER
    return None


def _reports(body: list[ast.stmt]) -> bool:
    for node in _own_nodes(body):
        if isinstance(node, ast.Raise):
            return True
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("append", "extend", "add") or REPORTS.search(name):
                return True
    return False


def _type_check(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "type")


def _checks_by_hand(test: ast.expr, typed: set[str]) -> bool:
    """Whether an ``if`` test checks a type by hand (also through a name ``typed`` bound to such a check) or refuses an unknown key."""
    for node in ast.walk(test):
        if _type_check(node) or (isinstance(node, ast.Name) and node.id in typed):
            return True
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and any(isinstance(op, ast.NotIn) for op in node.ops):
            return True
    return False


def config_validator_keys(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """The mapping keys a function checks by hand (see the module docstring for the rule).

    Args:
        fn: the function.

    Returns:
        The keys (ANY_KEY for an unknown-key loop, KEY_PARAMETER for a key given as a parameter).
    """
    params = {a.arg for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]}
    bound: dict[str, str] = {}
    typed: set[str] = set()  # names bound to a type check: ``ok = isinstance(v, int) and ...``
    nodes = _own_nodes(fn.body)
    for node in nodes:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            key = _key_read(node.value, params)
            targets = [t for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]
            bound.update({t.id: key for t in targets if key is not None})
            if any(_type_check(part) for part in ast.walk(node.value)):
                typed.update(t.id for t in targets)
        if (
            isinstance(node, ast.For)
            and isinstance(node.iter, ast.Call)
            and isinstance(node.iter.func, ast.Attribute)
            and node.iter.func.attr in ("items", "keys")
        ):
            first = node.target.elts[0] if isinstance(node.target, ast.Tuple) and node.target.elts else node.target
            if isinstance(first, ast.Name):
                bound[first.id] = ANY_KEY
    keys: set[str] = set()
    for node in nodes:
        if not (isinstance(node, ast.If) and _reports(node.body) and _checks_by_hand(node.test, typed)):
            continue
        for part in ast.walk(node.test):
            key = _key_read(part, params)
            if key is None and isinstance(part, ast.Compare) and isinstance(part.left, ast.Constant) and isinstance(part.left.value, str):
                key = part.left.value if any(isinstance(op, (ast.In, ast.NotIn)) for op in part.ops) else None
            if key is None and isinstance(part, ast.Name):
                key = bound.get(part.id)
            if key is not None and (key in (ANY_KEY, KEY_PARAMETER) or CONFIG_KEY.match(key)):
                keys.add(key)
    return keys


def is_config_validator(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether a function is a hand-written config validator (see the module docstring).

    Args:
        fn: the function.

    Returns:
        True when it raises and checks two mapping keys or more by hand, or one given as a parameter.
    """
    if not _raises(fn):
        return False
    keys = config_validator_keys(fn)
    return len(keys) >= 2 or KEY_PARAMETER in keys


def validators(root: Path) -> list[str]:
    """The hand-written config validators of a checkout, as ``file:line name``.

    Args:
        root: a fedimg checkout.

    Returns:
        One entry per function `is_config_validator` counts.
    """
    out: list[str] = []
    for path in _source_files(root):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and is_config_validator(node):
                out.append(f"{path.relative_to(root).as_posix()}:{node.lineno} {node.name}")
    return out


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def measure(root: Path) -> dict[str, object]:
    """Return the counts for the checkout at ``root``.

    Args:
        root: a fedimg checkout.

    Returns:
        A dict of counts, with the list of long files and their line counts.
    """
    named_validators = did_you_mean = html_writers = undocumented = 0
    long_files: dict[str, int] = {}
    for path in _source_files(root):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(root).as_posix()
        lines = text.count("\n") + (0 if text.endswith("\n") else 1)
        if lines > 500:
            long_files[rel] = lines
        tree = ast.parse(text, filename=rel)
        writes_html = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                head = node.value.lstrip().lower()
                if head.startswith(HTML_STARTS):
                    writes_html = True
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if VALIDATOR_NAME.search(node.name) and _raises(node):
                    named_validators += 1
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name == "get_close_matches":
                    did_you_mean += 1
        html_writers += writes_html
        for top in tree.body:
            if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _is_public(top.name):
                if ast.get_docstring(top) is None:
                    undocumented += 1
                if isinstance(top, ast.ClassDef):
                    for member in top.body:
                        if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_public(member.name):
                            if ast.get_docstring(member) is None:
                                undocumented += 1
    return {
        "validators": len(validators(root)),
        "validator_named_functions": named_validators,
        "did_you_mean_sites": did_you_mean,
        "html_writers": html_writers,
        "function_level_imports": _count_function_imports(root),
        "files_over_500_lines": len(long_files),
        "public_symbols_without_docstring": undocumented,
        "long_files": dict(sorted(long_files.items(), key=lambda kv: -kv[1])),
    }


def _count_function_imports(root: Path) -> int:
    """Count import statements whose nearest enclosing scope is a function (each counted once)."""
    count = 0

    class Visitor(ast.NodeVisitor):
        depth = 0

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            self.depth += 1
            self.generic_visit(node)
            self.depth -= 1

        visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

        def visit_Import(self, node: ast.Import) -> None:
            nonlocal count
            count += self.depth > 0

        visit_ImportFrom = visit_Import  # type: ignore[assignment]

    for path in _source_files(root):
        Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return count


def main() -> None:
    """Print the counts as JSON for the checkout given (default: this one); ``--validators`` lists them instead."""
    args = [a for a in sys.argv[1:] if a != "--validators"]
    root = Path(args[0]) if args else Path(__file__).resolve().parents[1]
    if "--validators" in sys.argv[1:]:
        print("\n".join(validators(root)))
        return
    print(json.dumps(measure(root), indent=2))


if __name__ == "__main__":
    main()

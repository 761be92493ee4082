"""Count the code-shape numbers issue 18 tracks, for any checkout: `python scripts/code_metrics.py [ROOT]`.

What is counted (source packages and scripts; tests and benchmarks are not):
- validators: hand-written config-checking functions (name starts with validate/check/require or
  is a number/type checker such as ``_num``/``_positive_int``) that raise an error;
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


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def measure(root: Path) -> dict[str, object]:
    """Return the counts for the checkout at ``root``.

    Args:
        root: a fedimg checkout.

    Returns:
        A dict of counts, with the list of long files and their line counts.
    """
    validators = did_you_mean = html_writers = undocumented = 0
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
                    validators += 1
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
        "validators": validators,
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
    """Print the counts as JSON for the checkout given (default: this one)."""
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    print(json.dumps(measure(root), indent=2))


if __name__ == "__main__":
    main()

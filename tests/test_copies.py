"""The "Copied from" check (like transformers' utils/check_copies.py).

Method files duplicate dpo.py's shared blocks on purpose, so each reads top to bottom. A copy is marked by the
comment line `# Copied from dpo.py: <name>` placed directly above a top-level `def <name>`, `class <name>`
(decorators included) or `<name> = ...`. The copy must stay byte-identical to the definition of the same name in the source file;
this test fails on any drift and says where. Fix a drift by editing the source and re-copying.

    python tests/test_copies.py          # prints every drifted copy, exit status 1 if any
    python tests/test_copies.py --fix    # rewrites every marked copy from its source
"""

import ast
import re
import sys
from pathlib import Path

MARK = re.compile(r"^# Copied from (?P<src>[\w.]+\.py): (?P<name>\w+)\s*$")


def top_level_defs(source: str) -> dict:
    """name -> exact source text of each top-level def/class (from its first decorator to its last line) or
    single-name assignment (a constant such as LORA_TARGETS)."""
    lines = source.splitlines(keepends=True)
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            out[node.name] = ("".join(lines[start:node.end_lineno]), start + 1)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ("".join(lines[node.lineno - 1:node.end_lineno]), node.lineno)
    return out


def check_copies(root: Path) -> tuple[list[str], int]:
    """Returns (problems, number of copies checked)."""
    problems, checked, cache = [], 0, {}
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        defs = None
        for lineno, line in enumerate(text.splitlines(), 1):
            m = MARK.match(line)
            if not m:
                continue
            defs = defs if defs is not None else top_level_defs(text)
            src_path = root / m["src"]
            if not src_path.exists():
                problems.append(f"{path.name}:{lineno}: source file {m['src']} does not exist")
                continue
            if src_path not in cache:
                cache[src_path] = top_level_defs(src_path.read_text(encoding="utf-8"))
            name = m["name"]
            copy = next((body for n, (body, start) in defs.items() if n == name and start == lineno + 1), None)
            if copy is None:
                problems.append(f"{path.name}:{lineno}: marker for {name!r} is not directly above `def/class {name}` or `{name} =`")
                continue
            if name not in cache[src_path]:
                problems.append(f"{path.name}:{lineno}: {m['src']} has no top-level def/class {name!r}")
                continue
            checked += 1
            if copy != cache[src_path][name][0]:
                a, b = cache[src_path][name][0].splitlines(), copy.splitlines()
                first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                problems.append(f"{path.name}:{lineno + 1 + first}: copy of {m['src']}:{name} drifted "
                                f"(first difference at line {first + 1} of the block)")
    return problems, checked


def test_copies_are_identical():
    root = Path(__file__).resolve().parents[1]
    problems, _ = check_copies(root)
    assert not problems, "\n".join(problems)


def test_checker_catches_a_drifted_copy(tmp_path):
    (tmp_path / "dpo.py").write_text("import os\n\n\n@staticmethod\ndef helper(x):\n    return x + 1\n\n\nclass Keep:\n    a = 1\n")
    (tmp_path / "good.py").write_text("# Copied from dpo.py: helper\n@staticmethod\ndef helper(x):\n    return x + 1\n")
    assert check_copies(tmp_path) == ([], 1)
    (tmp_path / "bad.py").write_text("x = 0\n# Copied from dpo.py: helper\n@staticmethod\ndef helper(x):\n    return x + 2\n")
    problems, n = check_copies(tmp_path)
    assert n == 2 and len(problems) == 1 and problems[0].startswith("bad.py:5: copy of dpo.py:helper drifted")
    assert fix_copies(tmp_path) == 1 and check_copies(tmp_path) == ([], 2)  # --fix re-copies the source
    assert (tmp_path / "bad.py").read_text().startswith("x = 0\n# Copied from dpo.py: helper\n@staticmethod")
    (tmp_path / "bad.py").write_text("# Copied from dpo.py: Keep\nclass Other:\n    a = 1\n")
    assert "not directly above" in check_copies(tmp_path)[0][0]
    (tmp_path / "bad.py").write_text("# Copied from dpo.py: missing\ndef missing():\n    pass\n")
    assert "has no top-level def/class 'missing'" in check_copies(tmp_path)[0][0]


def fix_copies(root: Path) -> int:
    """Overwrite every marked copy with its source's current text (like transformers' `make fix-copies`).
    Returns the number of copies rewritten."""
    fixed = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for _ in range(1000):  # one copy per pass: line numbers move after each rewrite
            lines = text.splitlines(keepends=True)
            defs = top_level_defs(text)
            target = None
            for lineno, line in enumerate(lines, 1):
                m = MARK.match(line.rstrip("\n"))
                if not m:
                    continue
                src = top_level_defs((root / m["src"]).read_text(encoding="utf-8")).get(m["name"])
                copy = next(((b, s) for n, (b, s) in defs.items() if n == m["name"] and s == lineno + 1), None)
                if src and copy and copy[0] != src[0]:
                    target = (lineno, copy, src[0])
                    break
            if target is None:
                break
            lineno, (body, start), new = target
            n_lines = len(body.splitlines(keepends=True))
            text = "".join(lines[:start - 1]) + new + "".join(lines[start - 1 + n_lines:])
            fixed += 1
        path.write_text(text, encoding="utf-8")
    return fixed


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    if "--fix" in sys.argv:
        print(f"rewrote {fix_copies(root)} copies")
    problems, n = check_copies(root)
    print("\n".join(problems) or f"{n} copies checked, all identical")
    sys.exit(1 if problems else 0)

"""The "Copied from" check (like transformers' utils/check_copies.py).

Method files duplicate dpo.py's shared blocks on purpose, so each reads top to bottom. A copy is marked by the
comment line `# Copied from dpo.py: <name>` placed directly above a top-level `def <name>`, `class <name>`
(decorators included) or `<name> = ...`. The copy must stay byte-identical to the definition of the same name in
dpo.py; this test fails on any drift and says where. Fix a drift by editing dpo.py and re-copying. Copies come from
dpo.py only, sit in dpo.py's order (so `diff dpo.py <method>.py` shows the method), and a top-level definition that
shares a name with one of dpo.py's (other than Args and main) must be a marked copy: an unmarked near-copy is how
the recipes drifted apart.

    python tests/test_copies.py          # prints every drifted copy, exit status 1 if any
    python tests/test_copies.py --fix    # rewrites every marked copy from its source
"""

import ast
import builtins
import re
import symtable
import sys
from pathlib import Path

MARK = re.compile(r"^# Copied from (?P<src>[\w.]+\.py): (?P<name>\w+)\s*$")
SOURCE = "dpo.py"  # the one file copies come from
OWN = {"Args", "main"}  # every recipe has its own


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
            if m["src"] != SOURCE:
                problems.append(f"{path.name}:{lineno}: copies come from {SOURCE} only, not {m['src']}")
                continue
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
    problems += check_names_and_order(root) + check_copies_resolve(root)
    return problems, checked


def check_names_and_order(root: Path) -> list[str]:
    """Unmarked top-level definitions named like one of dpo.py's, and marked copies out of dpo.py's order."""
    src = root / SOURCE
    if not src.exists():
        return []
    order = {name: i for i, name in enumerate(top_level_defs(src.read_text(encoding="utf-8")))}
    problems = []
    for path in sorted(root.glob("*.py")):
        if path.name == SOURCE:
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        marked = [MARK.match(line)["name"] for line in lines if MARK.match(line)]
        for name, (_, start) in top_level_defs("\n".join(lines) + "\n").items():
            if name in order and name not in OWN and not (start >= 2 and MARK.match(lines[start - 2])):
                problems.append(f"{path.name}:{start}: {name!r} has the name of a dpo.py definition but is not a "
                                f"marked copy (mark it '# Copied from dpo.py: {name}' or rename it)")
        ranks = [order[n] for n in marked if n in order]
        for k in range(1, len(ranks)):
            if ranks[k] < ranks[k - 1]:
                problems.append(f"{path.name}: copy of {marked[k]!r} sits after {marked[k - 1]!r}; keep dpo.py's order")
                break
    return problems


def check_copies_resolve(root: Path) -> list[str]:
    """A copy runs in its own module: every global name a marked copy uses must be bound in that file too (an import
    that dpo.py has and the copying file lacks breaks only the lines that use it, e.g. a rarely taken branch)."""
    problems = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        marked = {MARK.match(line)["name"] for line in text.splitlines() if MARK.match(line)}
        if not marked:
            continue
        top = symtable.symtable(text, path.name, "exec")
        bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()} | set(dir(builtins))

        def used(table):  # names the scope (and those inside it) reads from the module
            names = {s.get_name() for s in table.get_symbols() if s.is_global() and s.is_referenced()}
            return names.union(*(used(child) for child in table.get_children()))

        for table in top.get_children():
            if table.get_name() in marked:
                for name in sorted(used(table) - bound):
                    problems.append(f"{path.name}: the copy of {table.get_name()!r} uses {name!r}, which {path.name} "
                                    f"does not import or define")
    return problems


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
    (tmp_path / "bad.py").write_text("# Copied from good.py: helper\ndef helper(x):\n    return x + 1\n")
    assert "copies come from dpo.py only" in check_copies(tmp_path)[0][0]
    (tmp_path / "bad.py").write_text("def helper(x):\n    return x + 1\n")  # an unmarked near-copy
    assert "is not a marked copy" in check_copies(tmp_path)[0][0]
    (tmp_path / "bad.py").write_text("def main():\n    pass\n")  # every recipe has its own main
    assert check_copies(tmp_path)[0] == []
    (tmp_path / "good.py").write_text("# Copied from dpo.py: Keep\nclass Keep:\n    a = 1\n\n\n"
                                      "# Copied from dpo.py: helper\n@staticmethod\ndef helper(x):\n    return x + 1\n")
    assert "keep dpo.py's order" in check_copies(tmp_path)[0][0]
    (tmp_path / "dpo.py").write_text("import os\n\n\ndef where():\n    return os.getcwd()\n")
    (tmp_path / "good.py").write_text("# Copied from dpo.py: where\ndef where():\n    return os.getcwd()\n")
    assert "uses 'os', which good.py does not import" in check_copies(tmp_path)[0][-1]


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

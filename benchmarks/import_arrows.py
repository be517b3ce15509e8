"""Import arrows between satlm's layers, read from the source (every `import` and `from ... import`, also inside
functions): each arrow once, with the files that make it, and the arrows that point up.

    python benchmarks/import_arrows.py

Layers, bottom to top: core (tensor math) < library (config, errors, schedules, distributed, modeling,
integrations, assets) < data < app, bench < the cli entry point. An arrow points up when a lower layer imports a
higher one (core imports modeling, data imports app, ...).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "satlm"
RANK = {"core": 0, "library": 1, "data": 2, "app": 3, "bench": 3, "cli": 4}


def layer(module: str) -> str:
    """satlm.X.Y -> its layer."""
    parts = module.split(".")[1:]
    head = parts[0] if parts else ""
    if head in ("core", "data", "app", "bench"):
        return head
    if head == "cli":
        return "cli"
    return "library"


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    mod = module_of(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("satlm"):
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                out.update(names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("satlm"))
    return out


def main() -> None:
    arrows: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in sorted(ROOT.rglob("*.py")):
        src = layer(module_of(path))
        for target in imports(path):
            dst = layer(target)
            if dst != src:
                arrows[(src, dst)].add(str(path.relative_to(ROOT.parent)))
    up = []
    for (src, dst), files in sorted(arrows.items(), key=lambda kv: (RANK[kv[0][0]], RANK[kv[0][1]])):
        mark = "UP" if RANK[dst] > RANK[src] else ""
        print(f"{src:8} -> {dst:8} {mark:3} {len(files)} file(s)")
        if mark:
            up.append((src, dst, sorted(files)))
    for src, dst, files in up:
        print(f"upward {src} -> {dst}: {', '.join(files)}")
    print(f"{len(up)} upward arrow(s)")


if __name__ == "__main__":
    main()

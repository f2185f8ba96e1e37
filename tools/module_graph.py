"""The import graph between onenip's top-level units (its packages and top-level modules), from grimp, which
import-linter uses: how many modules, the edges between units, and any two units that import each other.

    python tools/module_graph.py              # the installed/checked-out onenip
    PYTHONPATH=OTHER/src python tools/module_graph.py   # another checkout, e.g. an older commit's worktree
"""

from __future__ import annotations

import collections

import grimp


def unit(module: str) -> str:
    """onenip.<first part>: the package or top-level module a module belongs to."""
    return ".".join(module.split(".")[:2])


def main() -> None:
    graph = grimp.build_graph("onenip")
    edges: collections.Counter[tuple[str, str]] = collections.Counter()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if unit(module) != unit(imported):
                edges[(unit(module), unit(imported))] += 1
    mutual = sorted((a, b) for (a, b) in edges if (b, a) in edges and a < b)
    units = {unit(m) for m in graph.modules}
    print(f"{len(graph.modules)} modules in {len(units)} units; {len(edges)} edges between units; "
          f"units importing each other: {', '.join(f'{a} <-> {b}' for a, b in mutual) or 'none'}")
    for (a, b), n in sorted(edges.items()):
        print(f"  {a} -> {b} ({n} imports)")


if __name__ == "__main__":
    main()

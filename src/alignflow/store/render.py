"""Text renderings of a lineage graph: an indented tree and Graphviz DOT."""

from __future__ import annotations

from alignflow.store.api import ArtifactInfo, LineageGraph


def label(info: ArtifactInfo | None, node_id: str) -> str:
    if info is None:
        return node_id[:12]
    name = f" {info.name}" if info.name else ""
    run = f" (run {info.run_id})" if info.run_id else ""
    return f"{info.kind}{name} [{node_id[:12]}]{run}"


def to_tree_lines(graph: LineageGraph) -> list[str]:
    """Indented lines from the root outwards; a node reached twice is shown once, then referenced."""
    children: dict[str, list[tuple[str, str]]] = {}
    for parent, child, role in graph.edges:
        src, dst = (child, parent) if graph.direction == "up" else (parent, child)
        children.setdefault(src, []).append((dst, role))
    lines: list[str] = []
    seen: set[str] = set()
    stack: list[tuple[str, str | None, int]] = [(graph.root, None, 0)]
    while stack:
        node, role, depth = stack.pop()
        prefix = "  " * depth + (
            f"<-{role}- " if role and graph.direction == "up" else f"-{role}-> " if role else ""
        )
        if node in seen:
            lines.append(prefix + label(graph.nodes.get(node), node) + " (see above)")
            continue
        seen.add(node)
        lines.append(prefix + label(graph.nodes.get(node), node))
        for dst, r in sorted(children.get(node, []), reverse=True):
            stack.append((dst, r, depth + 1))
    return lines


def to_dot(graph: LineageGraph) -> str:
    out = ["digraph lineage {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];']
    for nid, info in sorted(graph.nodes.items()):
        text = label(info, nid).replace('"', '\\"')
        style = ", style=bold" if nid == graph.root else ""
        out.append(f'  "{nid[:12]}" [label="{text}"{style}];')
    for parent, child, role in graph.edges:
        out.append(f'  "{parent[:12]}" -> "{child[:12]}" [label="{role}"];')
    out.append("}")
    return "\n".join(out)

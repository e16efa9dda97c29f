#!/usr/bin/env python3
"""Import cycles between the files of src/: prints every group of files that import each other in a
loop (a strongly connected component of the file import graph) and exits 1 if there is one.

An edge A -> B means file A names an item of file B: `use crate::x::y`, `use super::z`, or an inline
`crate::x::y::` path. `mod x;` declarations are not edges (a parent declares its children); a
`pub use x::Y` re-export in a parent is. A file's unit-test module (`#[cfg(test)] mod tests`, at
its end) is left out: it is not part of the running program's structure.

    python3 scripts/import-cycles.py [src]
"""
import os
import re
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "src"


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return tuple(rel)


files = {}
for root, _, names in os.walk(SRC):
    for n in names:
        if n.endswith(".rs"):
            p = os.path.join(root, n)
            files[p] = module_of(p)
by_module = {}
for p, m in files.items():
    # lib.rs and main.rs are both the crate root; main is a separate crate, keep lib as the root.
    if os.path.basename(p) == "main.rs":
        continue
    by_module[m] = p


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def expand(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    tree = tree.strip()
    i = tree.find("{")
    if i < 0:
        return [tree]
    head, body = tree[:i], tree[i + 1: tree.rindex("}")]
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    out = []
    for part in parts:
        if part.strip():
            out.extend(head + x for x in expand(part))
    return out


def resolve(segments, here):
    """The file a path names, or None (std and other crates)."""
    segs = [s.strip() for s in segments]
    segs = [s.split(" as ")[0].strip() for s in segs]
    if not segs:
        return None
    if segs[0] == "crate":
        base, rest = (), segs[1:]
    elif segs[0] in ("super", "self"):
        base = here
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
        rest = segs
    else:
        return None
    # Longest prefix of the path that is a file module.
    for k in range(len(rest), -1, -1):
        cand = base + tuple(rest[:k])
        if cand in by_module:
            return by_module[cand]
    return None


edges = {p: set() for p in files}
for path, mod in files.items():
    if os.path.basename(path) == "main.rs":
        continue
    # A file's `super` is its parent module; for mod.rs files the module is the directory.
    text = strip_comments(open(path, encoding="utf-8").read())
    cut = re.search(r"#\[cfg\(test\)\]\s*mod tests\b", text)
    if cut:
        text = text[: cut.start()]
    paths = []
    for stmt in re.findall(r"\buse\s+([^;]+);", text):
        stmt = stmt.replace("pub ", "").replace("\n", " ")
        paths.extend(expand(stmt))
    for inline in re.findall(r"\b((?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+)", text):
        paths.append(inline)
    for p in paths:
        target = resolve(p.split("::"), mod)
        if target and target != path:
            edges[path].add(target)

# Tarjan's strongly connected components.
index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        comps.append(comp)


sys.setrecursionlimit(10000)
for v in sorted(edges):
    if v not in index:
        visit(v)
loops = [sorted(c) for c in comps if len(c) > 1]
for c in loops:
    print("import loop:")
    for f in c:
        inside = sorted(os.path.relpath(t, SRC) for t in edges[f] if t in c)
        print(f"  {os.path.relpath(f, SRC)} -> {', '.join(inside)}")
n_edges = sum(len(v) for v in edges.values())
if loops:
    sys.exit(1)
print(f"import-cycles: {len(files)} files, {n_edges} imports between them, no loop")

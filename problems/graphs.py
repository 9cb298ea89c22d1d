"""Graphs for embedding: loading edge lists, built-in benchmark graphs, shortest-path distances.

A graph is a `Graph` (name, n nodes labelled 0..n-1, undirected edges [E, 2] with u < v, and whether
it substitutes for a graph of the talk that is not public). `load_graph(name_or_path)` is the one
entry point: built-in names (BUILTINS) are built in code, except the real graphs (protein, social),
which are read from a folder the user names (env BILEVEL_GRAPH_DATA) or ../shared/data/graphs.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph


@dataclass
class Graph:
    name: str
    n: int
    edges: np.ndarray  # [E, 2] int64, u < v, no duplicates, no self-loops
    substitute: bool = False  # True when it stands in for a non-public graph of the talk
    note: str = ""

    def adjacency(self):
        """Sparse symmetric 0/1 adjacency [n, n] (scipy CSR)."""
        u, v = self.edges.T
        a = sp.coo_matrix((np.ones(2 * len(u)), (np.r_[u, v], np.r_[v, u])), shape=(self.n, self.n))
        return a.tocsr()


# The benchmark trees of Cruceru et al. (dalab/matrix-manifolds), inlined so that results compare
# with the talk's Tree6 / Tree40 rows; every other built-in graph is generated below.
_TREE6 = [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5), (4, 6)]
_TREE40 = [(0, 1), (0, 2), (0, 10), (0, 18), (1, 5), (1, 16), (1, 28), (2, 3), (2, 4), (2, 19),
           (2, 29), (2, 36), (3, 8), (4, 7), (5, 6), (5, 23), (6, 12), (8, 9), (8, 11), (9, 14),
           (10, 20), (10, 30), (11, 13), (11, 15), (11, 26), (11, 33), (11, 34), (12, 39), (13, 17),
           (14, 31), (16, 32), (18, 21), (19, 25), (20, 22), (20, 24), (21, 27), (27, 35), (29, 37),
           (37, 38)]

# name of a real graph -> (file in the benchmark set, what it substitutes for)
REAL = {"protein": ("bio-yeast.edges.gz", "Protein"), "social": ("fb-messages.edges.gz", "Social")}
_SOURCE = ("the public graph benchmark of Cruceru, Becigneul, Ganea (2021), "
           "https://github.com/dalab/matrix-manifolds (folder data/graphs)")


def from_edges(edges, name, n=None, substitute=False, note="", largest_component=False):
    """Graph from an iterable of (u, v) integer pairs: self-loops and duplicates dropped, nodes
    relabelled 0..n-1 in sorted order. Raises ValueError if disconnected (unless largest_component)."""
    g = nx.Graph()
    if n is not None:
        g.add_nodes_from(range(n))
    g.add_edges_from((int(u), int(v)) for u, v in edges)
    return _finish(g, name, substitute, note, largest_component)


def _finish(g, name, substitute, note, largest_component):
    g.remove_edges_from(list(nx.selfloop_edges(g)))
    if g.number_of_nodes() < 2:
        raise ValueError(f"graph {name!r} has {g.number_of_nodes()} node(s) (no `u v` lines?); "
                         "need at least 2")
    comps = list(nx.connected_components(g))
    if len(comps) > 1:
        sizes = sorted((len(c) for c in comps), reverse=True)
        if not largest_component:
            raise ValueError(f"graph {name!r} is disconnected: {len(comps)} components of sizes "
                             f"{sizes[:5]}{'...' if len(comps) > 5 else ''}; distances between components "
                             "are infinite. Pass largest_component=True (CLI: --largest-component) "
                             "to embed its largest component.")
        g = g.subgraph(max(comps, key=len)).copy()
        note = (note + "; " if note else "") + f"largest component ({sizes[0]} of {sum(sizes)} nodes)"
    nodes = sorted(g.nodes())
    index = {v: i for i, v in enumerate(nodes)}
    e = np.array(sorted((min(index[u], index[v]), max(index[u], index[v])) for u, v in g.edges()),
                 dtype=np.int64).reshape(-1, 2)
    return Graph(name, len(nodes), e, substitute, note)


def load_edgelist(path, largest_component=False, name=None):
    """Read an edge list in networkx `read_edgelist` format (`u v [data]` a line, '#' comments),
    plain or gzip (by the .gz suffix). Node labels must be integers or strings (relabelled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no edge-list file at {path}")
    try:
        g = nx.read_edgelist(path)
    except Exception as e:  # networkx raises TypeError/IndexError on malformed lines
        raise ValueError(f"{path} is not a networkx edge list (`u v` or `u v {{}}` a line): {e}") from e
    try:
        g = nx.relabel_nodes(g, {v: int(v) for v in g.nodes()})
    except ValueError:
        g = nx.convert_node_labels_to_integers(g, ordering="sorted")
    return _finish(g, name or path.name.split(".")[0], False, f"from {path}", largest_component)


def cycle(n):
    return from_edges([(i, (i + 1) % n) for i in range(n)], f"cycle{n}")


def grid(side, dim=3):
    """The lattice {0..side-1}^dim with unit steps."""
    g = nx.convert_node_labels_to_integers(nx.grid_graph([side] * dim), ordering="sorted")
    return from_edges(g.edges(), f"grid{side}^{dim}", n=side ** dim)


def cube_surface(side):
    """Mesh of the surface of a cube: the lattice points of {0..side-1}^3 on its boundary."""
    g = nx.grid_graph([side] * 3)
    g.remove_nodes_from([p for p in list(g) if all(0 < c < side - 1 for c in p)])
    return from_edges(nx.convert_node_labels_to_integers(g, ordering="sorted").edges(),
                      f"cube_surface{side}")


def sphere_mesh(n, n_edges):
    """A mesh of the unit sphere: n Fibonacci points, joined by their n_edges shortest chords."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = np.pi * (1 + 5 ** 0.5) * i
    p = np.stack([np.sqrt(1 - z ** 2) * np.cos(phi), np.sqrt(1 - z ** 2) * np.sin(phi), z], 1)
    u, v = np.triu_indices(n, 1)
    order = np.argsort(np.linalg.norm(p[u] - p[v], axis=1), kind="stable")[:n_edges]
    return from_edges(zip(u[order], v[order]), f"sphere_mesh{n}", n=n)


def _named(g, name, substitute=False, note=""):
    g.name, g.substitute, g.note = name, substitute, note
    return g


BUILTINS = {
    "tree6": lambda: from_edges(_TREE6, "tree6", note="benchmark tree (Cruceru et al.)"),
    "tree40": lambda: from_edges(_TREE40, "tree40", note="benchmark tree (Cruceru et al.)"),
    "sphere100": lambda: _named(sphere_mesh(96, 211), "sphere100", True,
                                "generated 96-node sphere mesh, same size as the benchmark's "
                                "regular_sphere100 (the talk's Sphere100)"),
    "cycle10": lambda: _named(cycle(10), "cycle10"),
    "cube1": lambda: _named(grid(4, 3), "cube1", True, "substitute for the talk's Cube1: 4x4x4 lattice"),
    "cube2": lambda: _named(cube_surface(5), "cube2", True,
                            "substitute for the talk's Cube2: surface mesh of a 5x5x5 cube"),
}


def graph_data_dirs():
    """Folders searched for real graphs: $BILEVEL_GRAPH_DATA, then ../shared/data/graphs."""
    dirs = [Path(os.environ["BILEVEL_GRAPH_DATA"])] if os.environ.get("BILEVEL_GRAPH_DATA") else []
    return dirs + [Path(__file__).resolve().parents[1].parent / "shared" / "data" / "graphs"]


def load_real(name, largest_component=False):
    fname, talk = REAL[name]
    for d in graph_data_dirs():
        if (d / fname).is_file():
            g = load_edgelist(d / fname, largest_component, name)
            return _named(g, name, True, f"substitute for the talk's {talk}: {fname}")
    raise FileNotFoundError(
        f"graph {name!r} needs the file {fname} (substitute for the talk's {talk} graph, which is not "
        f"public). Download it from {_SOURCE} and either put it in a folder named by the environment "
        f"variable BILEVEL_GRAPH_DATA or pass its path: `bilevel embed --graph /path/to/{fname}`. "
        f"Searched: {', '.join(str(d) for d in graph_data_dirs())}")


def load_graph(name_or_path, largest_component=False):
    """A built-in graph by name (BUILTINS or REAL) or an edge-list file by path."""
    key = str(name_or_path)
    if key in BUILTINS:
        return BUILTINS[key]()
    if key in REAL:
        return load_real(key, largest_component)
    if Path(key).exists():
        return load_edgelist(key, largest_component)
    raise ValueError(f"unknown graph {key!r}: not a file, and not one of the built-in names "
                     f"{sorted([*BUILTINS, *REAL])}")


def shortest_paths(graph, sources=None):
    """Hop distances [len(sources) or n, n] (float64) by breadth-first search (scipy csgraph)."""
    return csgraph.shortest_path(graph.adjacency(), method="D", unweighted=True, directed=False,
                                 indices=sources)


def all_pairs(graph):
    """Every pair i < j: (pairs [P, 2] int64, d_G [P] float64)."""
    d = shortest_paths(graph)
    i, j = np.triu_indices(graph.n, 1)
    return np.stack([i, j], 1), d[i, j]


def sample_pairs(graph, n_pairs, rng, n_sources=64):
    """n_pairs random pairs i != j for graphs too large for all pairs: n_sources random source nodes,
    each with random targets; distances by BFS from the sources only. Returns (pairs [P, 2], d_G [P])."""
    n = graph.n
    n_sources = min(n, n_sources)
    src = rng.choice(n, size=n_sources, replace=False)
    d = shortest_paths(graph, src)
    per = int(np.ceil(n_pairs / n_sources))
    rows = np.repeat(np.arange(n_sources), per)
    tgt = (src[rows] + rng.integers(1, n, size=rows.size)) % n  # never the source itself
    return np.stack([src[rows], tgt], 1)[:n_pairs], d[rows, tgt][:n_pairs]

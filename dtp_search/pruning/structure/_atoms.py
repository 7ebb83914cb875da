"""Channel atoms and their union-find: which channels must go together, and the
:class:`~dtp_search.pruning.structure.groups.ChannelGroup` s their classes form."""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from dtp_search.pruning.structure.groups import ChannelGroup


class Atoms:
    """Union-find over channel atoms: every channel a layer writes is an atom, and atoms
    united end up in one unit of one :class:`ChannelGroup` (unless pinned)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pinned: set[int] = set()
        # (kind, module name, index within the module's tensor, atom)
        self.members: list[tuple[str, str, int, int]] = []
        self.inexact: list[tuple[str, int]] = []  # (consumer, atom) read through a lossy path

    # -- union-find ---------------------------------------------------------------------

    def new(self, n: int, pinned: bool = False) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if pinned:
            self.pinned.update(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    # -- the groups ----------------------------------------------------------------------

    def groups(self, order: dict[str, int]) -> list[ChannelGroup]:
        classes: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
        pinned_roots = {self.find(a) for a in self.pinned}
        for kind, module, index, atom in self.members:
            root = self.find(atom)
            if root not in pinned_roots:
                classes[root].append((kind, module, index))
        inexact = defaultdict(set)
        for consumer, atom in self.inexact:
            inexact[self.find(atom)].add(consumer)
        families: dict[tuple, list[tuple[int, list[tuple[str, str, int]]]]] = defaultdict(list)
        for root, members in classes.items():
            members.sort(key=lambda m: (order.get(m[1], math.inf), m[0], m[2]))
            signature = (
                tuple((k, mod) for k, mod, _ in members),
                frozenset(inexact.get(root, ())),
            )
            families[signature].append((root, members))
        out: list[ChannelGroup] = []
        taken: dict[str, int] = defaultdict(int)
        for (signature, lossy), units in families.items():
            if not any(kind == "rows" for kind, _ in signature):
                continue  # zero channels only: nothing to decide (compaction removes them)
            units.sort(key=lambda u: [m[2] for m in u[1]])
            group = ChannelGroup(name="", size=len(units), inexact=lossy)
            for kind, module in dict.fromkeys(signature):
                table = {"rows": group.rows, "norm": group.norms, "cols": group.columns}.get(
                    kind, group.pads
                )
                table[module] = torch.tensor(
                    [
                        [i for k, mod, i in members if (k, mod) == (kind, module)]
                        for _, members in units
                    ],
                    dtype=torch.long,
                )
            first = group.producers[0]
            taken[first] += 1
            group.name = first if taken[first] == 1 else f"{first}#{taken[first]}"
            out.append(group)
        out.sort(key=lambda g: (order.get(g.producers[0], math.inf), g.name))
        return out

    def zero_channels(self) -> dict[str, list[int]]:
        """For every pad module: its zero channels (entries as in :attr:`ChannelGroup.pads`)
        that no layer writes and no pinned tensor needs (compaction may drop them)."""
        pinned_roots = {self.find(a) for a in self.pinned}
        written = {self.find(atom) for kind, _, _, atom in self.members if kind != "pad"}
        out: dict[str, list[int]] = defaultdict(list)
        for kind, module, index, atom in self.members:
            root = self.find(atom)
            if kind == "pad" and root not in pinned_roots and root not in written:
                out[module].append(index)
        return dict(out)

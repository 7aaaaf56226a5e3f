"""The folder tree of the PV browser: site, instrument, and the server's sub-folders.

The server publishes each PV under ``<site>/<instrument>/<channel>`` (soft and derived
PVs under ``soft`` and ``derived``; big folders split by name segments). The tree shows
those folders with their PV counts; choosing one narrows the table to the PVs below it.
Each node's data is its folder path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from labctl.clients.tui.model import folder_of, folders
from labctl.clients.values import Metadata
from textual.widgets import Tree
from textual.widgets.tree import TreeNode


class PVTree(Tree[str]):
    """Folders of PVs; the node data is the folder path ("" for everything)."""

    def __init__(self, **kw: object) -> None:
        super().__init__("PVs", data="", **kw)  # type: ignore[arg-type]
        self.show_root = True
        self._shape: tuple[str, ...] = ()

    def show(self, site: str, metas: Iterable[Metadata]) -> None:
        """Build the folders of these PVs (kept as they are when the folders did not change)."""
        metas = list(metas)
        paths = folders(metas)
        counts: Counter[str] = Counter()
        for m in metas:
            folder = folder_of(m)
            while folder:
                counts[folder] += 1
                folder = folder.rpartition("/")[0]
        shape = (site, *(f"{p}={counts[p]}" for p in paths))
        if shape == self._shape:
            return
        self._shape = shape
        self.clear()
        self.root.set_label(f"{site or 'PVs'} ({len(metas)})")
        self.root.data = ""
        parents = {p.rpartition("/")[0] for p in paths}
        nodes: dict[str, TreeNode[str]] = {}
        for path in paths:
            parent_path = path.rpartition("/")[0]
            if not parent_path:  # the site folder itself is the root
                nodes[path] = self.root
                continue
            parent = nodes.get(parent_path, self.root)
            label = f"{path.rpartition('/')[2]} ({counts[path]})"
            if path in parents:
                nodes[path] = parent.add(label, data=path, expand=parent is self.root)
            else:
                nodes[path] = parent.add_leaf(label, data=path)
        self.root.expand()

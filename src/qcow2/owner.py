"""Method 2 of the 2011 thread, "read-only parent": an owner id per cluster.

Every snapshot and the live state is a node of a tree; the refcount blocks hold, for
each host cluster, the id of the node that owns it instead of a count (0: free, 1: image
metadata such as the header, the refcount structures and the snapshot table). A node's
tree (L1, L2 tables, data, VM state) references clusters it owns or that an ancestor
owns; the nodes referencing a cluster form a connected subtree under its owner.

* A write goes in place only where the live state owns the cluster (the COPIED flags of
  the live tree say so: an L1 entry's flag that the live state owns the L2 table, and
  inside such a table an entry's flag that it owns the data). Anything else is copied to
  a new cluster the live state owns; no other owner changes.
* Snapshot create is O(1) in the image size: the live node becomes the snapshot (its L1
  table stays where it is), and a new live node gets a copy of the L1 table with every
  COPIED flag cleared. No L2 table is read or written.
* Apply makes the live state a new child of the snapshot and frees what the old live
  node owned. Delete frees what a leaf owns, hands the one child what it still
  references, and hides a node with several children until at most one is left.

The tree lives in the snapshot table: each entry's extra data carries a `SnapshotNode`
(node id, parent id, flags: hidden, parent of the live state). The live node's id is the
owner of its L1 table. See docs/format-extensions.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from .errors import CorruptImageError, InvalidArgumentError, SnapshotError, UnsupportedFeatureError
from .format import (
    QCOW_OFLAG_COPIED,
    SNAPSHOT_EXTRA_V3_SIZE,
    SnapshotEntry,
    SnapshotNode,
    encode_table,
)
from .geometry import div_round_up
from .refcount import StandardRefcounts

META = 1  # the owner of image metadata: header, refcount table and blocks, snapshot table
FIRST_NODE = 2
_CLEAR = np.uint64(~QCOW_OFLAG_COPIED & 0xFFFFFFFFFFFFFFFF)


class OwnerRefcounts(StandardRefcounts):
    """Owner ids in the refcount blocks. Allocation is the standard allocator (a
    cluster is free where its value is 0); what it stores is the id of the node the
    allocation is for: the live node's (`live_id`) for the write path, META for the
    refcount structures, or whatever `owning()` names."""

    mode: ClassVar[str] = "owner"
    min_refcount_bits: ClassVar[int] = 8  # owner ids: 254 nodes at 8 bits, 65,533 at 16

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.live_id = 0
        self._owner = META
        self._comp_releases: list[int] = []
        self._comp_live: np.ndarray | None = None
        self._live_compressed = lambda: np.zeros(0, dtype=np.int64)

    # -- the strategy's policy -----------------------------------------------------------
    @staticmethod
    def visible(entry: SnapshotEntry) -> bool:
        return not node_of(entry).hidden

    def attach(self, img: Any) -> None:
        ops = img._snapshots
        self.live_id = live_node_id(ops, self)
        self._comp_releases = []
        self._comp_live = None  # compressed references of the live tree, counted on demand

        def live_compressed() -> np.ndarray:
            cmap = ops.clusters
            return ops._references(cmap.l1, 0, 0)[1]

        self._live_compressed = live_compressed

    def may_pack(self, cluster: int) -> bool:
        return False  # an owner cannot count several compressed clusters in one

    def snapshot_create(self, img: Any, *args: Any) -> SnapshotEntry:
        return create_snapshot(img, *args)

    def snapshot_apply(self, img: Any, entry: SnapshotEntry, disk: int, vm_index: int,
                       sn_l1: np.ndarray) -> None:
        apply_snapshot(img, entry, disk, vm_index, sn_l1)

    def snapshot_delete(self, img: Any, entries: list[SnapshotEntry], i: int) -> None:
        delete_snapshot(img, entries, i)
        reclaim_hidden(img)

    @staticmethod
    def parents(img: Any) -> dict[str, str]:
        return snapshot_parents(img._snapshots)

    # -- values --------------------------------------------------------------------------
    @contextmanager
    def owning(self, node: int) -> Iterator[None]:
        """Allocations inside are for this node."""
        old, self._owner = self._owner, node
        try:
            yield
        finally:
            self._owner = old

    def update(self, clusters: np.ndarray, delta: int) -> None:
        # The standard allocator's increments allocate and its decrements free.
        clusters = np.asarray(clusters, dtype=np.int64)
        if not len(clusters) or delta == 0:
            return
        if delta > 0:
            self.assign(clusters, self._owner, expect_free=True)
        else:
            self.assign(clusters, 0)

    def update_dense(self, counts: np.ndarray, sign: int, start: int = 0) -> None:
        self.update(np.flatnonzero(np.asarray(counts)) + start, sign)

    def assign(self, clusters: np.ndarray, value: int | np.ndarray,
               expect_free: bool = False) -> None:
        """Set the owner of each cluster (0 frees it), all-or-nothing."""
        clusters = np.asarray(clusters, dtype=np.int64)
        if not len(clusters):
            return
        vals = np.broadcast_to(np.asarray(value, dtype=np.uint64), clusters.shape)
        order = np.argsort(clusters, kind="stable")
        clusters, vals = clusters[order], vals[order]
        if len(clusters) > 1 and (np.diff(clusters) == 0).any():
            raise CorruptImageError("One cluster given two owners at once")
        if int(vals.max()) > self.geo.refcount_max:
            raise SnapshotError(f"Owner id {int(vals.max())} does not fit in "
                                f"refcount_bits={self.geo.refcount_bits}")
        bits = self.geo.refblock_bits
        mask = (1 << bits) - 1
        bidx = clusters >> bits
        starts = np.flatnonzero(np.r_[True, bidx[1:] != bidx[:-1]])
        ends = np.r_[starts[1:], len(clusters)]
        for s, e in zip(starts.tolist(), ends.tolist()):
            b = int(bidx[s])
            if self._block(b) is None:
                if not vals[s:e].all():
                    raise CorruptImageError("Free of a cluster without an owner")
                self._create_block(b)
        for s, e in zip(starts.tolist(), ends.tolist()):
            block = self._block(int(bidx[s]))
            assert block is not None
            cur = block[clusters[s:e] & mask]
            if expect_free and cur.any():
                raise CorruptImageError("Allocation of a cluster that already has an owner")
            if ((vals[s:e] == 0) & (cur == 0)).any():
                raise CorruptImageError("Free of a cluster without an owner")
        for s, e in zip(starts.tolist(), ends.tolist()):
            b = int(bidx[s])
            block = self._block(b)
            assert block is not None
            idx = clusters[s:e] & mask
            block[idx] = vals[s:e]
            self._blocks.mark_dirty(self._block_offset(b))
            freed = idx[vals[s:e] == 0]
            if len(freed):
                first = (b << bits) + int(freed.min())
                if self._atomic:
                    self._tx_min_freed = min(self._tx_min_freed, first)
                    self._tx_mask(b)[freed] = True
                else:
                    self._free_hint = min(self._free_hint, first)

    def owners(self) -> np.ndarray:
        """The owner of every cluster a refcount block describes (uint64 array)."""
        return self.get_range(0, self._top_block() << self.geo.refblock_bits)

    # -- allocation for the live state -----------------------------------------------------
    def _reserve(self, n: int, extra: int) -> int:
        with self.owning(self.live_id):
            return super()._reserve(n, extra)

    def tx_allocate(self, n: int, live: bool) -> int:
        with self.owning(self.live_id if live else self._owner):
            return self.allocate_deferred(n)

    def add_reference(self, cluster: int) -> None:
        raise CorruptImageError("Owner mode cannot add a second reference to a cluster")

    def may_share(self, img: Any, entry: SnapshotEntry, clusters: np.ndarray) -> bool:
        # The live node may reference a cluster only if every node on its path up to
        # the owner does (the invariant): the snapshot's clusters qualify when the
        # snapshot is the live node's parent (its own references satisfy the invariant
        # up from it). Any other snapshot (an older ancestor, a sibling) may not hold
        # them on the whole path: no sharing, the caller copies.
        return node_of(entry).node_id == Tree.of(img._snapshot_entries(), self.live_id).live_parent

    def share(self, clusters: np.ndarray) -> None:
        # an owner value stays the ancestor's: nothing to store; the live tree's count
        # of compressed references (for freeing packed clusters) is recounted on demand
        self._comp_live = None

    def release_compressed(self, host_offset: int, n: int = 1) -> None:
        c = host_offset >> self.geo.cluster_bits
        self._comp_releases.extend(range(c, c + n))

    def note_compressed(self, host_offset: int, n: int) -> None:
        if self._comp_live is not None:
            c = host_offset >> self.geo.cluster_bits
            self._grow_comp(c + n)
            self._comp_live[c : c + n] += 1

    def _grow_comp(self, end: int) -> None:
        assert self._comp_live is not None
        if end > len(self._comp_live):
            grown = np.zeros(max(end, 2 * len(self._comp_live)), dtype=np.int64)
            grown[: len(self._comp_live)] = self._comp_live
            self._comp_live = grown

    def apply_releases(self) -> None:
        # A dropped reference frees the cluster only where the live state owned it; a
        # cluster an ancestor owns stays that ancestor's.
        free: list[np.ndarray] = []
        if self._releases:
            rel = _unique(np.array(self._releases, dtype=np.int64))
            self._releases = []
            free.append(rel)
        if self._comp_releases:
            # Packed compressed clusters share host clusters, which a node owns once:
            # it is free when no compressed cluster of the live tree is left in it.
            rel = np.array(self._comp_releases, dtype=np.int64)
            self._comp_releases = []
            if self._comp_live is None:
                # counted now, after the drops: they are not in it
                self._comp_live = np.bincount(self._live_compressed(), minlength=1)
            else:
                self._grow_comp(int(rel.max()) + 1)
                np.subtract.at(self._comp_live, rel, 1)
            self._grow_comp(int(rel.max()) + 1)
            rel = _unique(rel)
            free.append(rel[self._comp_live[rel] <= 0])
        if free:
            rel = _unique(np.concatenate(free))
            self.assign(rel[self.get_many(rel) == self.live_id], 0)

    def update_live(self, clusters: np.ndarray, sign: int) -> None:
        raise CorruptImageError("Owner mode keeps no reference counts")


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values by sorting (numpy's hash-based np.unique is many times
    slower on the million-entry arrays of whole-image passes)."""
    a = np.sort(np.asarray(a), kind="stable")
    return a[np.r_[True, a[1:] != a[:-1]]] if len(a) else a


# ============================================================================ the tree ==
def node_of(e: SnapshotEntry) -> SnapshotNode:
    return SnapshotNode.unpack(e.unknown_extra[: SnapshotNode.SIZE])


def with_node(e: SnapshotEntry, node: SnapshotNode) -> SnapshotEntry:
    extra = node.pack() + e.unknown_extra[SnapshotNode.SIZE :]
    return replace(e, unknown_extra=extra, extra_data_size=SNAPSHOT_EXTRA_V3_SIZE + len(extra))


def add_node(e: SnapshotEntry, node: SnapshotNode) -> SnapshotEntry:
    """A standard entry (without a node record) given one, in front of its extra data."""
    extra = node.pack() + e.unknown_extra
    return replace(e, unknown_extra=extra, extra_data_size=SNAPSHOT_EXTRA_V3_SIZE + len(extra))


def without_node(e: SnapshotEntry) -> SnapshotEntry:
    extra = e.unknown_extra[SnapshotNode.SIZE :]
    return replace(e, unknown_extra=extra, extra_data_size=SNAPSHOT_EXTRA_V3_SIZE + len(extra))


@dataclass
class Tree:
    """The snapshot tree as the table holds it, plus the live node."""

    entries: list[SnapshotEntry]
    nodes: list[SnapshotNode]
    live_id: int

    @classmethod
    def of(cls, entries: list[SnapshotEntry], live_id: int) -> Tree:
        return cls(list(entries), [node_of(e) for e in entries], live_id)

    @property
    def live_parent(self) -> int:
        for n in self.nodes:
            if n.live_parent:
                return n.node_id
        return 0

    def index(self, node_id: int) -> int:
        for i, n in enumerate(self.nodes):
            if n.node_id == node_id:
                return i
        return -1

    def children(self, node_id: int) -> list[int]:
        kids = [n.node_id for n in self.nodes if n.parent_id == node_id]
        if self.live_parent == node_id:
            kids.append(self.live_id)
        return kids

    def new_id(self, limit: int, exclude: tuple[int, ...] = ()) -> int:
        used = {n.node_id for n in self.nodes} | {self.live_id, *exclude}
        nid = FIRST_NODE
        while nid in used:
            nid += 1
        if nid > limit:
            raise SnapshotError(
                f"No free node id: {len(used)} nodes use the ids refcount_bits allows; "
                "delete snapshots or amend refcount_bits")
        return nid

    def set(self, i: int, node: SnapshotNode) -> None:
        self.nodes[i] = node
        self.entries[i] = with_node(self.entries[i], node)

    def move_live_parent(self, to: int) -> None:
        for i, n in enumerate(self.nodes):
            want = n.flags | SnapshotNode.LIVE_PARENT if n.node_id == to else \
                n.flags & ~SnapshotNode.LIVE_PARENT
            if want != n.flags:
                self.set(i, replace(n, flags=want))

    def remove(self, i: int) -> None:
        del self.entries[i]
        del self.nodes[i]


def snapshot_parents(img: Any) -> dict[str, str]:
    """id of each listed snapshot -> id of its nearest listed ancestor (roots absent)."""
    entries = img._snapshot_entries()
    by_id = {node_of(e).node_id: e for e in entries}
    out: dict[str, str] = {}
    for e in entries:
        node = node_of(e)
        if node.hidden:
            continue
        p, seen = node.parent_id, 0
        while p in by_id and node_of(by_id[p]).hidden and seen <= len(entries):
            p, seen = node_of(by_id[p]).parent_id, seen + 1
        if p in by_id:
            out[e.id] = by_id[p].id
    return out


def tree_lines(img: Any) -> list[str]:
    """The snapshot tree as `qcow2 snapshot -l --tree` draws it: every node, hidden ones
    marked deleted, the live state marked as the current state."""
    entries = img._snapshot_entries()
    nodes = [node_of(e) for e in entries]
    kids: dict[int, list[tuple[str, int]]] = {}
    live_parent = 0
    for e, n in zip(entries, nodes):
        label = f"{e.id} {e.name}" + (" (deleted, kept for its children)" if n.hidden else "")
        kids.setdefault(n.parent_id, []).append((label, n.node_id))
        if n.live_parent:
            live_parent = n.node_id
    kids.setdefault(live_parent, []).append(("(current state)", -1))
    lines: list[str] = []

    def walk(parent: int, prefix: str, depth: int) -> None:
        items = kids.get(parent, [])
        for k, (label, nid) in enumerate(items):
            last = k == len(items) - 1
            lines.append(prefix + ("`-- " if last else "|-- ") + label)
            if nid > 0 and depth < len(entries) + 1:
                walk(nid, prefix + ("    " if last else "|   "), depth + 1)

    walk(0, "", 0)
    return lines


def live_node_id(img: Any, rc: OwnerRefcounts) -> int:
    """The live node: the owner of the active L1 table (a fresh id when it has none)."""
    cmap = img.clusters
    entries = img._snapshot_entries()
    ids = {node_of(e).node_id for e in entries}
    if len(cmap.l1) and cmap.l1_offset:
        owner = rc.get(cmap.l1_offset >> img.geo.cluster_bits)
        if owner < FIRST_NODE or owner in ids:
            raise CorruptImageError(
                f"The active L1 table has owner {owner}, not a live node: run 'qcow2 check -r all'")
        return owner
    return Tree.of(entries, 0).new_id(img.geo.refcount_max)


def node_refs(img: Any, l1: np.ndarray, l1_offset: int, l1_size: int) -> np.ndarray:
    """Every host cluster a node's tree references, once."""
    plain, comp = img._references(l1, l1_offset, l1_size)
    return _unique(np.concatenate([plain, comp]))


def entry_refs(img: Any, e: SnapshotEntry) -> np.ndarray:
    return node_refs(img, img._snapshot_l1(e), e.l1_table_offset, e.l1_size)


def live_refs(img: Any) -> np.ndarray:
    cmap = img.clusters
    return node_refs(img, cmap.l1, cmap.l1_offset, len(cmap.l1))


# ======================================================================= operations ==
# (This module's functions that take `img`, here and above, are given the image's
# SnapshotOps (snapshot.py): the snapshot table, tree walker and transaction helpers,
# with the image's storage, geometry, header and cluster map. OwnerRefcounts' hooks
# and the conversions below take the Image and pass its SnapshotOps on.)
def _write_padded(img: Any, table: np.ndarray, kind: str = "l1") -> int:
    """A table in new clusters of the current owner, padded to whole clusters (so that
    what a snapshot writes does not depend on the image size)."""
    cs = img.geo.cluster_size
    n = div_round_up(len(table) * 8, cs)
    if not n:
        return 0
    off = img._rc().allocate_deferred(n)
    data = encode_table(table)
    img.storage.pwrite(data + bytes(n * cs - len(data)), off, kind)
    return off


def _write_table(img: Any, tree: Tree) -> tuple[int, bytes]:
    """The snapshot table into new META clusters; the old one is freed."""
    from .snaptable import pack_snapshot_table

    rc = img._rc()
    table = pack_snapshot_table(tree.entries) if tree.entries else b""
    t_off = 0
    if table:
        cs = img.geo.cluster_size
        t_off = rc.allocate_deferred(div_round_up(len(table), cs))
        img.storage.pwrite(table, t_off, "snapshot_table")
    old, size = img.header.snapshots_offset, img._table_size()
    if old and size:
        first = old // img.geo.cluster_size
        rc.assign(np.arange(first, first + div_round_up(size, img.geo.cluster_size),
                            dtype=np.int64), 0)
    return t_off, table


def _commit(img: Any, tree: Tree, **header: int) -> None:
    """Write the snapshot table and switch the header to it (the transaction's commit)."""
    rc = img._rc()
    t_off, table = _write_table(img, tree)
    n = len(tree.entries)
    rc.commit_atomic(lambda rt: img._update_header(
        **rt, **header, nb_snapshots=n, snapshots_offset=t_off))
    img._snap_cache = (t_off, n, list(tree.entries), len(table))
    img._snapshot_gen += 1


@contextmanager
def _transaction(img: Any) -> Iterator[OwnerRefcounts]:
    rc = img._rc()
    assert isinstance(rc, OwnerRefcounts)
    img.clusters.l2cache.drop_all()
    rc.begin_atomic()
    try:
        yield rc
    except BaseException:
        rc.abort_atomic()
        img.clusters.l2cache.drop_all()
        raise


def create_snapshot(img: Any, entries: list[SnapshotEntry], new: SnapshotEntry,
                    vm: memoryview, vm_index: int, sn_l1_size: int) -> SnapshotEntry:
    """The live node becomes the snapshot; a new live node, its child, gets a copy of
    the L1 table without COPIED flags. O(L1 size), whatever the image holds."""
    rc = img._rc()
    assert isinstance(rc, OwnerRefcounts)
    cs = img.geo.cluster_size
    cmap = img.clusters
    rc.return_pool()  # reserved for the live node, which is about to become the snapshot
    tree = Tree.of(entries, rc.live_id)
    frozen = rc.live_id
    child = tree.new_id(img.geo.refcount_max)
    old_l1, old_off = cmap.l1, cmap.l1_offset
    n_old = div_round_up(len(old_l1) * 8, cs) if old_off else 0
    # The snapshot keeps the live L1 table where it is; VM state entries go into the
    # slack of its last cluster (past l1_size, which no reader looks at) when they fit.
    in_place = bool(n_old) and sn_l1_size * 8 <= n_old * cs and not old_l1[vm_index:].any()
    with _transaction(img):
        vm_l1 = np.zeros(0, dtype=np.uint64)
        if len(vm):
            with rc.owning(frozen):
                vm_l1 = img._write_vm_state(vm)
        if in_place:
            sn_off = old_off
            if len(vm_l1):
                img.storage.pwrite(encode_table(vm_l1), old_off + vm_index * 8, "l1")
        else:
            sn_l1 = np.zeros(sn_l1_size, dtype=np.uint64)
            k = min(vm_index, len(old_l1))
            sn_l1[:k] = old_l1[:k]
            sn_l1[vm_index:] = vm_l1
            with rc.owning(frozen):
                sn_off = _write_padded(img, sn_l1)
            if n_old:
                rc.assign(np.arange(old_off // cs, old_off // cs + n_old, dtype=np.int64), 0)
        new_l1 = old_l1 & _CLEAR
        with rc.owning(child):
            l1_off = _write_padded(img, new_l1)
        node = SnapshotNode(frozen, tree.live_parent, SnapshotNode.LIVE_PARENT)
        tree.move_live_parent(0)
        made = add_node(replace(new, l1_table_offset=sn_off if sn_l1_size else 0), node)
        tree.entries.append(made)
        tree.nodes.append(node)
        _commit(img, tree, l1_table_offset=l1_off)
    img._switch_l1(new_l1, l1_off)
    rc.live_id = child
    rc._comp_live = None
    return made


def apply_snapshot(img: Any, entry: SnapshotEntry, disk: int, vm_index: int,
                   sn_l1: np.ndarray) -> None:
    """The live state becomes a new child of the snapshot; what the old live node
    owned is freed."""
    rc = img._rc()
    assert isinstance(rc, OwnerRefcounts)
    rc.return_pool()
    entries = img._snapshot_entries()
    tree = Tree.of(entries, rc.live_id)
    old = rc.live_id
    child = tree.new_id(img.geo.refcount_max)
    target = node_of(entry).node_id
    new_l1 = np.zeros(vm_index, dtype=np.uint64)
    m = min(vm_index, len(sn_l1))
    new_l1[:m] = sn_l1[:m] & _CLEAR
    with _transaction(img):
        owners = rc.owners()
        rc.assign(np.flatnonzero(owners == old), 0)
        with rc.owning(child):
            l1_off = _write_padded(img, new_l1)
        tree.move_live_parent(target)
        _commit(img, tree, size=disk, l1_table_offset=l1_off, l1_size=vm_index)
    img._switch_l1(new_l1, l1_off)
    rc.live_id = child
    rc._comp_live = None
    reclaim_hidden(img)


def delete_snapshot(img: Any, entries: list[SnapshotEntry], i: int) -> None:
    """No child: free what the node owns. One child: hand it what it still references,
    free the rest. Several: hide the node (reclaimed when one child is left)."""
    rc = img._rc()
    assert isinstance(rc, OwnerRefcounts)
    tree = Tree.of(entries, rc.live_id)
    node = tree.nodes[i]
    kids = tree.children(node.node_id)
    with _transaction(img):
        if len(kids) > 1:
            tree.set(i, replace(node, flags=node.flags | SnapshotNode.HIDDEN))
            _commit(img, tree)
            return
        owned = np.flatnonzero(rc.owners() == node.node_id)
        if kids:
            kid = kids[0]
            if kid == tree.live_id:
                refs = live_refs(img)
                tree.move_live_parent(node.parent_id)
            else:
                k = tree.index(kid)
                refs = entry_refs(img, tree.entries[k])
                tree.set(k, replace(tree.nodes[k], parent_id=node.parent_id))
            keep = np.isin(owned, refs)
            rc.assign(owned[~keep], 0)
            rc.assign(owned[keep], kid)
        else:
            rc.assign(owned, 0)
        i = tree.index(node.node_id)
        tree.remove(i)
        _commit(img, tree)


def reclaim_hidden(img: Any) -> None:
    """Delete every hidden node that has at most one child left."""
    while True:
        rc = img._rc()
        entries = img._snapshot_entries()
        tree = Tree.of(entries, rc.live_id)
        todo = [i for i, n in enumerate(tree.nodes)
                if n.hidden and len(tree.children(n.node_id)) <= 1]
        if not todo:
            return
        delete_snapshot(img, entries, todo[0])


# ======================================================================= conversion ==
def from_standard(image: Any) -> None:
    """Standard refcounts -> owners, crash-atomically. The tree: a chain in creation
    order (the live state last) when every cluster's referencing nodes are consecutive
    in it, the first of them owning it; otherwise every node is a child of one hidden
    root, which owns what several nodes share (anything a chain cannot express)."""
    from .snaptable import pack_snapshot_table

    img = image._snapshots
    img._rc()
    geo = img.geo
    if geo.refcount_bits < 8:
        raise InvalidArgumentError("refcount_mode=owner needs refcount_bits of at least 8")
    entries = list(img._snapshot_entries())
    # chain position -> table index (the table keeps its order)
    order = sorted(range(len(entries)), key=lambda k: (entries[k].date_sec, entries[k].date_nsec, k))
    cmap = img.clusters
    split = [img._references(img._snapshot_l1(entries[k]), entries[k].l1_table_offset,
                             entries[k].l1_size) for k in order]
    split.append(img._references(cmap.l1, cmap.l1_offset, len(cmap.l1)))
    n = len(split)
    refs = []
    for k, (plain, comp) in enumerate(split):
        both = np.concatenate([plain, _unique(comp)])
        if len(both) != len(_unique(both)):
            what = "the live state" if k == n - 1 else f"snapshot '{entries[order[k]].name}'"
            raise UnsupportedFeatureError(
                f"Owner mode cannot represent {what}: it references a host cluster twice "
                "other than by packed compressed clusters")
        refs.append(_unique(both))
    cl = np.concatenate(refs) if refs else np.zeros(0, dtype=np.int64)
    who = np.repeat(np.arange(n, dtype=np.int64), [len(r) for r in refs])
    total = max(int(cl.max()) + 1 if len(cl) else 0, 1)
    first = np.full(total, n, dtype=np.int64)
    last = np.full(total, -1, dtype=np.int64)
    count = np.bincount(cl, minlength=total)
    np.minimum.at(first, cl, who)
    np.maximum.at(last, cl, who)
    used = count > 0
    chain = bool((last[used] - first[used] + 1 == count[used]).all())
    ids = [FIRST_NODE + k for k in range(n)]  # the live node is the last
    root = FIRST_NODE + n
    if root > geo.refcount_max:
        raise SnapshotError("Too many snapshots for owner ids of this refcount width")
    new_entries = list(entries)
    for k in range(n - 1):
        parent = (ids[k - 1] if k else 0) if chain else root
        flags = SnapshotNode.LIVE_PARENT if k == n - 2 and chain else 0
        new_entries[order[k]] = add_node(entries[order[k]], SnapshotNode(ids[k], parent, flags))
    owner_of = np.zeros(total, dtype=np.uint64)
    if chain:
        owner_of[used] = np.asarray(ids, dtype=np.uint64)[first[used]]
    else:
        single = used & (count == 1)
        owner_of[single] = np.asarray(ids, dtype=np.uint64)[first[single]]
        owner_of[used & (count > 1)] = root
        hidden = SnapshotEntry(
            l1_table_offset=0, l1_size=0, id=_unused_id(entries), name="", date_sec=0,
            date_nsec=0, vm_clock_nsec=0, vm_state_size=0, disk_size=img.header.size,
            icount=None)
        # hidden, and the live state's parent
        flags = SnapshotNode.HIDDEN | SnapshotNode.LIVE_PARENT
        new_entries.insert(0, add_node(hidden, SnapshotNode(root, 0, flags)))
    pack_snapshot_table(new_entries)  # size check before anything changes
    _switch_values(image, owner_of, new_entries, "owner")


def _unused_id(entries: list[SnapshotEntry]) -> str:
    from .snaptable import next_snapshot_id

    return next_snapshot_id(entries)


def to_standard(image: Any) -> None:
    """Owners -> standard refcounts, crash-atomically: hidden nodes go (what only they
    referenced is freed), every other reference is counted. The COPIED flags of the
    live tree are then set as standard qcow2 wants them (a second transaction)."""
    img = image._snapshots
    entries = img._snapshot_entries()
    keep = [without_node(e) for e in entries if not node_of(e).hidden]
    cmap = img.clusters
    # standard counts every reference: a packed host cluster once per compressed cluster
    refs = [np.concatenate(img._references(img._snapshot_l1(e), e.l1_table_offset, e.l1_size))
            for e in entries if not node_of(e).hidden]
    refs.append(np.concatenate(img._references(cmap.l1, cmap.l1_offset, len(cmap.l1))))
    cl = np.concatenate(refs)
    counts = np.bincount(cl, minlength=1).astype(np.uint64) if len(cl) else np.zeros(1, np.uint64)
    if len(counts) and int(counts.max()) > img.geo.refcount_max:
        raise SnapshotError("A cluster has more references than refcount_bits can count")
    _switch_values(image, counts, keep, "standard")
    # the live tree's COPIED flags as the counts want them
    rc = img._rc()
    with img._bulk():
        cmap.l2cache.drop_all()
        rc.begin_atomic()
        try:
            new_l1 = img._recompute_copied(cmap.l1)
            if (new_l1 == cmap.l1).all():
                rc.abort_atomic()
                return
            l1_off = img._write_new_table(new_l1, "l1", live=True)
            img._free_tables(cmap.l1_offset, len(cmap.l1) * 8, live=True)
            rc.commit_atomic(lambda rt: img._update_header(**rt, l1_table_offset=l1_off))
        except BaseException:
            rc.abort_atomic()
            cmap.l2cache.drop_all()
            raise
        img._switch_l1(new_l1, l1_off)


def _switch_values(image: Any, values: np.ndarray, entries: list[SnapshotEntry], mode: str) -> None:
    """One transaction: every cluster's stored value becomes values[c] (0 past its
    end) except the image metadata (META in owner mode, 1 in standard: the same), the
    snapshot table is rewritten, and the header switches mode bit and tables."""
    from .format import INCOMPAT_REFCOUNT_MODES, REFCOUNT_MODE_BITS
    from .snaptable import pack_snapshot_table

    img = image._snapshots
    rc = img._rc()
    cs = img.geo.cluster_size
    bits = (img.header.incompatible_features & ~INCOMPAT_REFCOUNT_MODES) | REFCOUNT_MODE_BITS[mode]
    table = pack_snapshot_table(entries) if entries else b""
    with img._bulk():
        img.clusters.l2cache.drop_all()
        rc.begin_atomic()
        try:
            # metadata keeps its value 1; the old snapshot table is freed and the new
            # one counted once (what QEMU counts, and META for owners)
            old_t, old_size = img.header.snapshots_offset, img._table_size()
            t_off = 0
            if table:
                t_off = rc.allocate_deferred(div_round_up(len(table), cs))
                img.storage.pwrite(table, t_off, "snapshot_table")
            cur = rc.get_range(0, max(len(values), rc._top_block() << img.geo.refblock_bits))
            want = np.zeros(len(cur), dtype=np.uint64)
            want[: min(len(values), len(cur))] = values[: len(cur)]
            meta = np.zeros(len(cur), dtype=bool)
            meta[0] = True
            rt0 = rc.reftable_offset // cs
            meta[rt0 : rt0 + rc.reftable_clusters] = True
            for c in rc.refblock_clusters:
                if c < len(meta):
                    meta[c] = True
            if t_off:
                meta[t_off // cs : t_off // cs + div_round_up(len(table), cs)] = True
            if old_t and old_size:
                want[old_t // cs : old_t // cs + div_round_up(old_size, cs)] = 0
                meta[old_t // cs : old_t // cs + div_round_up(old_size, cs)] = False
            for c in _bitmap_clusters(image):
                if c < len(meta):
                    meta[c] = True
            want[meta] = 1
            # the transaction's own clusters (moved blocks, tables) are counted as it goes
            tx = np.zeros(len(cur), dtype=bool)
            for b, m in rc._tx_freed.items():
                lo = b << img.geo.refblock_bits
                tx[lo : lo + len(m)] |= m[: max(0, len(cur) - lo)]
            change = np.flatnonzero((want != cur) & ~tx)
            if len(change):
                _set_values(rc, change, want[change])
            rc.commit_atomic(lambda rt: img._update_header(
                **rt, nb_snapshots=len(entries), snapshots_offset=t_off,
                incompatible_features=bits))
        except BaseException:
            rc.abort_atomic()
            img.clusters.l2cache.drop_all()
            raise
    img._snap_cache = None
    img._snapshot_gen += 1
    image._reopen_refcounts()


def _set_values(rc: StandardRefcounts, clusters: np.ndarray, values: np.ndarray) -> None:
    """Set stored values whatever the strategy's arithmetic (conversions)."""
    if isinstance(rc, OwnerRefcounts):
        cur = rc.get_many(clusters)
        free = values == 0
        rc.assign(clusters[free & (cur != 0)], 0)
        sel = ~free
        if sel.any():
            rc.assign(clusters[sel], values[sel])
        return
    cur = rc.get_many(clusters).astype(np.int64)
    delta = values.astype(np.int64) - cur
    down = delta < 0
    if down.any():
        rc.update(np.repeat(clusters[down], -delta[down]), -1)
    up = delta > 0
    if up.any():
        rc.update(np.repeat(clusters[up], delta[up]), +1)


def _bitmap_clusters(img: Any) -> list[int]:
    """Clusters of persistent bitmaps (directory, tables, data): image metadata."""
    from .bitmaps import read_directory, read_table

    ext, bitmaps = read_directory(img.storage, img.layout.bitmaps_ext,
                                  img.header.autoclear_features, img.storage.size())
    if ext is None:
        return []
    cs = img.geo.cluster_size
    out: list[int] = []
    if ext.directory_size:
        first = ext.directory_offset // cs
        out += range(first, div_round_up(ext.directory_offset + ext.directory_size, cs))
    for b in bitmaps:
        first = b.table_offset // cs
        out += range(first, div_round_up(b.table_offset + b.table_size * 8, cs))
        offs = read_table(img.storage, b) & np.uint64(0x00FFFFFFFFFFFE00)
        out += (offs[offs != 0] // np.uint64(cs)).astype(np.int64).tolist()
    return out


OwnerRefcounts.enter = staticmethod(from_standard)  # type: ignore[assignment]
OwnerRefcounts.leave = staticmethod(to_standard)  # type: ignore[assignment]

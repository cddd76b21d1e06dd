"""`qcow2 check` for owner mode (owner.py): the structure checks of the counting check,
then the owner invariant instead of a count comparison.

For every host cluster: the nodes whose trees reference it (snapshots, hidden nodes,
the live state) must all descend from its owner (or be it), each one's path up to the
owner must reference it too, and the owner must reference it unless it is a hidden
node. Image metadata (header, refcount table and blocks, snapshot table, bitmaps) is
owned by META. An unreferenced cluster with an owner is a leak; anything else is a
corruption. `-r leaks` frees leaks; `-r all` also rebuilds owners from reachability
(the referencing node nearest the root, where that satisfies the invariant) and clears
COPIED flags of the live tree that claim clusters the live state does not own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .check import MAX_MESSAGES, _Checker, _last_nonzero, _read_u64
from .errors import Qcow2Error
from .format import (
    L1E_OFFSET_MASK,
    QCOW_OFLAG_COPIED,
    REFT_OFFSET_MASK,
    decode_table,
    encode_table,
)
from .owner import FIRST_NODE, META, node_of
from .tree import L2Entries

_U64 = np.uint64
_MAX_NODES_CHECKED = 4096  # the ancestor matrix is nodes x nodes booleans


class OwnerChecker(_Checker):
    rebuilt = False  # -r all wrote a new refcount structure (once per check)

    def _calculate(self, snapshots: Any, snap_size: int) -> None:
        self.snap_size = snap_size
        self.snapshot_list = snapshots
        super()._calculate(snapshots, snap_size)

    def _metadata(self, n: int) -> np.ndarray:
        """Which of the first n clusters are image metadata (owned by META)."""
        cs, h = self.cs, self.img.header
        meta = np.zeros(n, dtype=bool)

        def mark(offset: int, length: int) -> None:
            if length > 0:
                meta[offset // cs : min(n, -(-(offset + length) // cs))] = True

        mark(0, cs)
        mark(h.refcount_table_offset, h.refcount_table_clusters * cs)
        offs = self.reftable & _U64(REFT_OFFSET_MASK)
        blocks = (offs[(offs != 0) & (offs % _U64(cs) == 0)] // _U64(cs)).astype(np.int64)
        meta[blocks[blocks < n]] = True
        if h.nb_snapshots:
            mark(h.snapshots_offset, self.snap_size)
        try:
            from .owner import _bitmap_clusters

            bm = np.array(_bitmap_clusters(self.img), dtype=np.int64)
            meta[bm[(bm >= 0) & (bm < n)]] = True
        except Qcow2Error:
            pass  # reported by the bitmap checks
        return meta

    def _compare(self, fix: bool) -> None:
        res, refs = self.res, self.refs
        self._load_stored()
        stored = self.stored
        D = len(stored)
        ref = refs.dense[:D]
        self.highest = max(_last_nonzero(stored), _last_nonzero(ref))
        self.mismatch = (np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                         np.zeros(0, bool))
        self.live_id = 0
        img = self.img
        h = img.header
        try:
            entries = img._snapshots._snapshot_entries()
        except Qcow2Error as exc:
            res.msg(f"ERROR snapshot table: {exc}")
            res.corruptions += 1
            return
        # -- the tree ----------------------------------------------------------------
        nodes = []
        for e in entries:
            if len(e.unknown_extra) < 16:
                res.msg(f"ERROR snapshot {e.id} ({e.name}) has no owner-mode node record")
                res.corruptions += 1
                return
            nodes.append(node_of(e))
        ids = [nd.node_id for nd in nodes]
        live_id = 0
        if h.l1_size and h.l1_table_offset and (h.l1_table_offset >> self.cb) < D:
            live_id = int(stored[h.l1_table_offset >> self.cb])
        problems = []
        if len(set(ids)) != len(ids) or any(i < FIRST_NODE for i in ids):
            problems.append("node ids are not distinct ids of nodes")
        if h.l1_size and not live_id:
            # the L1 table's owner is lost (its refcount block is missing or zeroed): the
            # live id is what its L2 tables say; the owner comparison below reports the
            # lost owners and -r all writes them back
            live_id = self._live_id_from_l2(stored, set(ids))
        if h.l1_size and (live_id < FIRST_NODE or live_id in ids):
            problems.append(f"the active L1 table has owner {live_id}, not a live node")
        if not live_id:
            live_id = max([FIRST_NODE - 1, *ids]) + 1
        if sum(nd.live_parent for nd in nodes) > 1:
            problems.append("several nodes are marked as the live state's parent")
        known = set(ids)
        if any(nd.parent_id and nd.parent_id not in known for nd in nodes):
            problems.append("a node's parent does not exist")
        n = len(nodes) + 1
        if n > _MAX_NODES_CHECKED:
            res.msg(f"ERROR too many nodes for the owner check ({n})")
            res.check_errors += 1
            return
        all_ids = np.array([*ids, live_id], dtype=np.int64)
        pidx = np.full(n, -1, dtype=np.int64)
        pos = {nid: k for k, nid in enumerate(all_ids.tolist())}
        for k, nd in enumerate(nodes):
            pidx[k] = pos.get(nd.parent_id, -1) if nd.parent_id else -1
        lp = [nd.node_id for nd in nodes if nd.live_parent]
        pidx[n - 1] = pos[lp[0]] if lp else -1
        anc = np.zeros((n, n), dtype=bool)
        depth = np.zeros(n, dtype=np.int64)
        for k in range(n):
            x, steps = k, 0
            while x >= 0 and steps <= n:
                anc[k, x] = True
                x = int(pidx[x])
                steps += 1
            if steps > n:
                problems.append("the parent links form a cycle")
                break
            depth[k] = steps
        if problems:
            for p in problems:
                res.msg(f"ERROR snapshot tree: {p}")
            res.corruptions += len(problems)
            return
        self.live_id = live_id
        hidden = np.array([nd.hidden for nd in nodes] + [False])
        # -- references per node: one sort of (cluster, node) keys for all nodes, each
        # pair once (a node's tree may name a cluster several times: packed compressed
        # clusters share one). The node index sits in the low bits (shifts, not divisions).
        shift = max(1, (n - 1).bit_length())
        parts = []
        for k, e in enumerate(entries):
            try:
                ops = img._snapshots
                plain, comp = ops._references(ops._snapshot_l1(e), e.l1_table_offset, e.l1_size)
            except Qcow2Error:
                continue  # reported by the structure checks
            parts.append((np.concatenate([plain, comp]) << shift) | k)
        try:
            l1 = _read_u64(self.storage, h.l1_table_offset, h.l1_size, self.file_size) \
                if h.l1_size else np.zeros(0, dtype=np.uint64)
            plain, comp = img._snapshots._references(l1, h.l1_table_offset, h.l1_size)
            parts.append((np.concatenate([plain, comp]) << shift) | (n - 1))
        except Qcow2Error:
            pass
        keys = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        # each node's clusters come mostly in ascending runs, which timsort merges
        keys = np.sort(keys[keys < (D << shift)], kind="stable")
        if len(keys):
            keys = keys[np.r_[True, keys[1:] != keys[:-1]]]
        cl, xi = keys >> shift, keys & ((1 << shift) - 1)  # by cluster, then by node
        node_count = np.bincount(cl, minlength=D)[:D]

        def member(c: np.ndarray, x: np.ndarray) -> np.ndarray:
            """Whether node x references cluster c (keys is sorted)."""
            if not len(keys):
                return np.zeros(len(c), dtype=bool)
            q = (c << shift) | x
            p = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
            return keys[p] == q
        # -- the invariant -------------------------------------------------------------------
        max_id = int(all_ids.max())
        if max_id < (1 << 22):  # node ids are small: a lookup table from id to index
            lut = np.full(max_id + 2, -1, dtype=np.int64)
            lut[all_ids] = np.arange(n)

            def index_of(owner: np.ndarray) -> np.ndarray:
                return lut[np.minimum(owner.astype(np.uint64), _U64(max_id + 1)).astype(np.intp)]
        else:
            sorted_ids = np.sort(all_ids)
            id_order = np.argsort(all_ids)

            def index_of(owner: np.ndarray) -> np.ndarray:
                o = owner.astype(np.int64)
                p = np.minimum(np.searchsorted(sorted_ids, o), n - 1)
                return np.where(sorted_ids[p] == o, id_order[p], -1)

        own_c = index_of(stored)  # each cluster's owner as a node index (-1: none)
        oi = own_c[cl]
        # the referencing node descends from the owner ...
        ok = (oi >= 0) & anc.reshape(-1)[xi * n + np.maximum(oi, 0)]
        # ... and its parent references the cluster too, unless the parent is the owner
        up = pidx[xi]
        need = ok & (oi != xi) & (up != oi)
        if need.any():
            ok[need] = member(cl[need], up[need])
        bad_c = np.zeros(D, dtype=bool)
        bad_c[cl[~ok]] = True
        # the owner references it, or is a hidden node
        owner_refs = np.zeros(D, dtype=bool)
        owner_refs[cl[xi == oi]] = True
        own_ok = (own_c >= 0) & (hidden[np.maximum(own_c, 0)] | owner_refs)
        bad_c |= (node_count > 0) & ~own_ok
        meta = self._metadata(D)
        both = meta & (node_count > 0)
        if both.any():
            res.msg_many(lambda c: f"ERROR cluster {c} is both image metadata and node data",
                         [np.flatnonzero(both)])
        bad_c |= meta & (stored != META)
        leak = (ref == 0) & (stored != 0)
        bad_c |= (node_count > 0) & (stored == 0)
        bad_c &= ~leak
        mism = np.flatnonzero(bad_c | leak)
        if not len(mism):
            return
        # what -r all would store, for the clusters found wrong only: META, or the
        # root-most referencing node when that satisfies the invariant
        want = np.zeros(D, dtype=np.uint64)
        want[meta] = META
        fixable = ~both
        wrong = np.zeros(D, dtype=bool)
        wrong[mism] = True
        sel = wrong[cl]
        c2, x2 = cl[sel], xi[sel]
        if len(c2):
            first = np.r_[True, c2[1:] != c2[:-1]]
            group = np.cumsum(first) - 1
            d = depth[x2]
            is_top = d == np.minimum.reduceat(d, np.flatnonzero(first))[group]
            # of equally deep referencing nodes the last one (highest index) is the root
            t = np.flatnonzero(is_top)
            t = t[np.r_[group[t][1:] != group[t][:-1], True]]
            top = np.full(D, -1, dtype=np.int64)
            top[c2[t]] = x2[t]
            r = top[c2]
            good = (r >= 0) & anc[x2, np.maximum(r, 0)]
            par = pidx[x2]
            needp = good & (x2 != r)
            if needp.any():
                good[needp] = member(c2[needp], par[needp])
            fixable[c2[~good]] = False
            hit = (top >= 0) & ~meta
            want[hit] = all_ids[top[hit]].astype(np.uint64)
        self.mismatch = (mism, stored[mism].astype(np.uint64), want[mism], fixable[mism] | leak[mism])
        if fix or not len(mism):
            return
        is_leak = leak[mism]
        res.msg_many(lambda c, s, w, lk: f"Leaked cluster {c} owner={s}" if lk else
                     f"ERROR cluster {c} owner={s} expected owner={w}",
                     [mism, stored[mism], want[mism], is_leak])
        res.leaks += int(is_leak.sum())
        res.corruptions += int((~is_leak).sum())

    def _live_id_from_l2(self, stored: np.ndarray, node_ids: set[int]) -> int:
        """The live node's id as the owners of the active L2 tables give it (the most
        common one that is no snapshot's), or a new id when none does."""
        h = self.img.header
        try:
            l1 = _read_u64(self.storage, h.l1_table_offset, h.l1_size, self.file_size)
        except Qcow2Error:
            l1 = np.zeros(0, dtype=np.uint64)
        l2 = (l1 & _U64(L1E_OFFSET_MASK)) >> _U64(self.cb)
        l2 = l2[(l2 != 0) & (l2 < len(stored))].astype(np.int64)
        owners = stored[l2].astype(np.int64)
        owners = owners[(owners >= FIRST_NODE) & ~np.isin(owners, list(node_ids))]
        if len(owners):
            values, counts = np.unique(owners, return_counts=True)
            return int(values[np.argmax(counts)])
        return max([FIRST_NODE - 1, *node_ids]) + 1

    def _fix_in_place(self) -> None:
        res = self.res
        mism, s_vals, w_vals, fixable = self.mismatch
        leak = w_vals == 0
        want = fixable & ((leak & self.fix_leaks) | (~leak & self.fix_errors))
        fixed = self._write_in_blocks(mism, w_vals, want)
        if self.fix_errors and not self.rebuilt and (want & ~fixed).any():
            # an owner to store where no sound refcount block holds it (a range whose
            # block is missing): the whole owner map goes into a new structure
            self._rebuild_owners()
            return
        res.msg_many(lambda c, s, w, f: f"{'Repairing' if f else 'Leaked' if not w else 'ERROR'} "
                     f"cluster {c} owner={s} expected owner={w}", [mism, s_vals, w_vals, fixed])
        res.leaks -= int((fixed & leak).sum())
        res.corruptions -= int((fixed & ~leak).sum())
        res.leaks_fixed += int((fixed & leak).sum())
        res.corruptions_fixed += int((fixed & ~leak).sum())
        self.mismatch = (mism[~fixed], s_vals[~fixed], w_vals[~fixed], fixable[~fixed])

    def _rebuild_and_recheck(self, snapshots: Any, snap_size: int) -> None:
        self._fix_in_place()
        if self.rebuild and not self.rebuilt:  # the structure itself is damaged
            self._rebuild_owners()

    def _rebuild_owners(self) -> None:
        """check.py's rebuild (new table and blocks in free clusters, then one header
        write) with owners for counts: the repaired owner map, the new structure owned
        by META (the rebuild adds 1 to each of its clusters: META is 1), the old one
        freed. Then everything is checked again."""
        assert META == 1
        self.rebuilt = True
        super()._rebuild_and_recheck(self.snapshot_list, self.snap_size)

    def _rebuild_values(self) -> np.ndarray:
        D = self.refs.nb
        vals = np.zeros(D, dtype=np.int64)
        n = min(D, len(self.stored))
        vals[:n] = self.stored[:n]
        mism, _s, w_vals, fixable = self.mismatch
        leak = w_vals == 0
        take = fixable & ((leak & self.fix_leaks) | (~leak & self.fix_errors)) & (mism < D)
        vals[mism[take]] = w_vals[take].astype(np.int64)
        return vals

    def _check_copied(self) -> None:
        """COPIED in the live tree means "the live state owns it": an L1 entry's flag
        for its L2 table, and inside a table it owns an entry's flag for the data. A
        flag missing where the live state owns the cluster only costs a copy."""
        res, h, cb = self.res, self.img.header, self.cb
        live = self.live_id
        if not h.l1_size or not live:
            return
        repair = self.fix_errors or (self.fix_leaks and not res.corruptions and not res.leaks)
        word = "Repairing" if repair else "ERROR"
        l1 = _read_u64(self.storage, h.l1_table_offset, h.l1_size, self.file_size)
        l2off = (l1 & _U64(L1E_OFFSET_MASK)).astype(np.int64)
        flagged = np.flatnonzero((l2off != 0) & ((l1 & _U64(QCOW_OFLAG_COPIED)) != 0))
        if not len(flagged):
            return
        owner, ok = self._stored_many(l2off[flagged] >> cb)
        bad = ok & (owner != live)
        n_bad = int(bad.sum())
        for i, e, o in zip(flagged[bad][:MAX_MESSAGES].tolist(), l1[flagged][bad].tolist(),
                           owner[bad].tolist()):
            res.msg(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} owner={o}")
        changed = False
        if n_bad:
            if repair:
                l1[flagged[bad]] &= ~_U64(QCOW_OFLAG_COPIED)
                self.storage.pwrite(encode_table(l1), h.l1_table_offset, "l1")
                res.corruptions_fixed += n_bad
                changed = True
            else:
                res.corruptions += n_bad
        ext = self.geo.extended_l2
        for off in l2off[flagged[~bad]].tolist():
            if off + self.cs > self.file_size:
                continue
            table = decode_table(self.storage.pread(self.cs, off))
            d = L2Entries(self.geo, table[None, :])  # the tree walker's decoding, one table
            ent = d.ent[0]
            normal = d.normal[0] & ((ent & _U64(QCOW_OFLAG_COPIED)) != 0)
            if not normal.any():
                continue
            where = np.flatnonzero(normal)
            owners, ok2 = self._stored_many(d.hoff[0][where].astype(np.int64) >> cb)
            wrong = where[ok2 & (owners != live)]
            if not len(wrong):
                continue
            res.msg_many(lambda ev: f"{word} OFLAG_COPIED data cluster: l2_entry={ev:x} "
                         "not owned by the live state", [ent[wrong]])
            if not repair:
                res.corruptions += len(wrong)
                continue
            if not self._may_write_table(off):
                res.check_errors += 1
                continue
            ent[wrong] &= ~_U64(QCOW_OFLAG_COPIED)
            if ext:
                table[0::2] = ent
            self.storage.pwrite(encode_table(table), off, "l2")
            res.corruptions_fixed += len(wrong)
            changed = True
        if changed:
            self.storage.sync()
            self.changed = True

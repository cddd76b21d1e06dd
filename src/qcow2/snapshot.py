"""Internal snapshots (owned by the snapshot work; see issue 3)."""

from __future__ import annotations


class SnapshotMixin:
    """Snapshot methods of Image: snapshots, create_snapshot, apply_snapshot,
    delete_snapshot, read_vm_state, snapshot(name_or_id)."""

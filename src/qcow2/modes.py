"""Refcount modes: the registry, and conversion between modes in place.

A mode is a `RefcountStrategy` class (refcount.py, lazycount.py): the engine asks it, it
never compares mode names. The mode of an image is recorded on disk by one incompatible
feature bit of ours plus the refcount-mode header extension (docs/format-extensions.md);
a standard image has neither and is plain qcow2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .check import _Checker
from .errors import CorruptImageError, FormatError, InvalidArgumentError, UnsupportedFeatureError
from .format import (
    EXT_FEATURE_TABLE,
    EXT_REFCOUNT_MODE,
    FEATURE_NAMES,
    INCOMPAT_REFCOUNT_MODES,
    OUR_FEATURE_NAMES,
    REFCOUNT_MODE_BITS,
    REFCOUNT_MODE_IDS,
    Header,
    HeaderExtension,
    RefcountModeExt,
    mode_of,
    pack_feature_table,
)
from .header import extension_area, set_extension, write_cluster0
from .lazycount import LazyCountRefcounts
from .owner import OwnerRefcounts
from .ownercheck import OwnerChecker
from .refcount import StandardRefcounts

MODES: dict[str, type[StandardRefcounts]] = {
    "standard": StandardRefcounts,
    "lazy-count": LazyCountRefcounts,
    "owner": OwnerRefcounts,
}

# The check pass of each mode whose stored values are not counts (the others use the
# counting check). Kept here, beside the registry, so that check.py needs no mode.
CHECKERS: dict[type[StandardRefcounts], type[_Checker]] = {OwnerRefcounts: OwnerChecker}


def checker_of(header: Header) -> type[_Checker]:
    """The check pass for an image's refcount mode."""
    return CHECKERS.get(MODES[mode_of(header)], _Checker)


def check_mode_name(name: str) -> str:
    if name not in MODES:
        raise InvalidArgumentError(
            f"Invalid refcount_mode '{name}': use {', '.join(MODES)}")
    return name


def set_refcount_mode(img: Any, new_mode: str, *, fresh: bool = False) -> None:
    """Convert an image opened read-write to another refcount mode, in place and
    crash-atomically: the new stored refcounts go to clusters the old image does not
    use (a refcount transaction), and one header write switches refcount table and
    mode bit together. A crash before it leaves the old mode, after it the new one.

    The stored counts change by exactly the live state's references: subtracted when
    going to a mode whose live weight is 0, added when going back (an overflow there
    raises RefcountOverflowError and changes nothing: amend refcount_bits first).

    The extension left behind by a conversion back to standard is ignored (its bit is
    clear) and reused by the next conversion. fresh: the image was just created and
    nothing depends on cluster 0 yet, so it is rewritten whole (with our feature name).
    """
    check_mode_name(new_mode)
    img._check_writable()
    old_mode = mode_of(img.header)
    if new_mode == old_mode:
        return
    if img.header.version < 3:
        raise InvalidArgumentError(
            "Refcount modes other than standard need compatibility level 1.1 (compat=1.1)")
    img.flush()
    rc = img.refcounts
    rc.close()  # pool returned, releases applied: the stored counts are exact
    leave, enter = MODES[old_mode].leave, MODES[new_mode].enter
    if leave is not None or enter is not None:
        # a mode that is not a count of references converts through standard
        if leave is not None:
            leave(img)
        elif old_mode != "standard":
            set_refcount_mode(img, "standard")
        if new_mode == "standard":
            return
        _put_extension(img, new_mode, fresh)
        if enter is not None:
            enter(img)
        else:
            set_refcount_mode(img, new_mode)
        return
    delta = MODES[new_mode].live_weight - MODES[old_mode].live_weight
    live = img._snapshots._live_counts()
    if delta < 0:
        stored = rc.get_range(0, len(live)).astype(np.int64)
        if (stored < live).any():
            bad = int(np.flatnonzero(stored < live)[0])
            raise CorruptImageError(
                f"Refcount of cluster {bad} is lower than its references: run 'qcow2 check -r all'")
    if new_mode != "standard":
        _put_extension(img, new_mode, fresh)
    bits = (img.header.incompatible_features & ~INCOMPAT_REFCOUNT_MODES) | REFCOUNT_MODE_BITS[new_mode]
    with rc.bulk(len(live)):
        rc.begin_atomic()
        try:
            if delta:
                rc.update_dense(live, 1 if delta > 0 else -1)
            rc.commit_atomic(lambda rt: img._update_header(**rt, incompatible_features=bits))
        except BaseException:
            rc.abort_atomic()
            raise
    img._reopen_refcounts()


def _put_extension(img: Any, new_mode: str, fresh: bool) -> None:
    """The extension goes in first, with the bit still clear: a reader ignores it
    until the switch sets the bit. fresh (a new image): QEMU's feature name table is
    replaced by one with our feature's name too, or left out where there is no room."""
    ext = RefcountModeExt(REFCOUNT_MODE_IDS[new_mode])
    if img.layout.refcount_mode_ext == ext:
        return
    if fresh:
        h = img.header
        raw = bytes(img.storage.pread(h.cluster_size, 0)).ljust(h.cluster_size, b"\0")
        exts = [e for e in extension_area(raw, h)[0] if e.type != EXT_REFCOUNT_MODE]
        mine = HeaderExtension(EXT_REFCOUNT_MODE, ext.pack())
        table = HeaderExtension(EXT_FEATURE_TABLE,
                                pack_feature_table({**FEATURE_NAMES, **OUR_FEATURE_NAMES}))
        named = [table if e.type == EXT_FEATURE_TABLE else e for e in exts]
        if table not in named:
            named.append(table)
        for candidate in (named, [e for e in exts if e.type != EXT_FEATURE_TABLE]):
            try:
                write_cluster0(img, h, [*candidate, mine])
                return
            except (FormatError, UnsupportedFeatureError):
                continue
    _append_extension(img, ext)


def _append_extension(img: Any, ext: RefcountModeExt) -> None:
    """The refcount-mode extension rewritten in its place, or added after the others
    (header.set_extension: crash-safe against torn writes of cluster 0)."""
    set_extension(img, EXT_REFCOUNT_MODE, ext.pack())

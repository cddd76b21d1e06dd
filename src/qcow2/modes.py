"""Refcount modes: the registry, and conversion between modes in place.

A mode is a `RefcountStrategy` class (refcount.py, lazycount.py): the engine asks it, it
never compares mode names. The mode of an image is recorded on disk by one incompatible
feature bit of ours plus the refcount-mode header extension (docs/format-extensions.md);
a standard image has neither and is plain qcow2.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Any

import numpy as np

from .errors import CorruptImageError, FormatError, InvalidArgumentError, UnsupportedFeatureError
from .format import (
    EXT_END,
    EXT_REFCOUNT_MODE,
    INCOMPAT_REFCOUNT_MODES,
    REFCOUNT_MODE_BITS,
    REFCOUNT_MODE_IDS,
    Header,
    RefcountModeExt,
    mode_of,
)
from .header import pack_cluster0, read_layout
from .lazycount import LazyCountRefcounts
from .owner import OwnerRefcounts
from .refcount import StandardRefcounts

MODES: dict[str, type[StandardRefcounts]] = {
    "standard": StandardRefcounts,
    "lazy-count": LazyCountRefcounts,
    "owner": OwnerRefcounts,
}


def live_weight_of(header: Header) -> int:
    return MODES[mode_of(header)].live_weight


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
    live = img._live_counts()
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
    until the switch sets the bit."""
    layout = img.layout
    ext = RefcountModeExt(REFCOUNT_MODE_IDS[new_mode])
    if layout.refcount_mode_ext == ext:
        return
    data = None
    if fresh:
        # a new image: cluster 0 written whole, with our feature's name, or
        # without the (optional) name table where there is no room for it
        for names in (True, False):
            try:
                data = pack_cluster0(replace(layout, refcount_mode_ext=ext),
                                     img.geo.cluster_size, feature_table=names)
                break
            except FormatError:
                continue
    if data is None:
        _append_extension(img, ext)
    else:
        img.storage.pwrite(data, 0, "header")
        img.storage.sync()
        img.layout = read_layout(img.storage)  # (the backing name may have moved)
        img.header = img.layout.header


def _append_extension(img: Any, ext: RefcountModeExt) -> None:
    """Put the refcount-mode extension into cluster 0 so that a torn write (any subset
    of its sectors) leaves a header that parses as before: nothing before the end
    marker moves. An existing one is rewritten in place (its mode id is one aligned
    word). Otherwise it goes where the end marker is, after the bytes behind the marker
    (dead) are zeroed and synced, so a sector that did not make it reads as the end
    marker again; a backing file name in the way is first copied to the end of the
    cluster and the header pointed at the copy."""
    st = img.storage
    cs = img.geo.cluster_size
    h = img.header
    raw = bytearray(st.pread(cs, 0))
    pos = h.header_length
    mine = -1
    while True:
        etype, length = struct.unpack_from(">II", raw, pos)
        if etype == EXT_END:
            break
        if etype == EXT_REFCOUNT_MODE:
            mine = pos
        pos += 8 + ((length + 7) & ~7)
    blob = struct.pack(">II", EXT_REFCOUNT_MODE, len(ext.pack())) + ext.pack()
    if mine >= 0:
        st.pwrite(ext.pack(), mine + 8, "header")
        st.sync()
    else:
        need_end = pos + len(blob) + 8
        if need_end > cs:
            raise UnsupportedFeatureError(
                "No room in the first cluster for the refcount mode header extension")
        if h.backing_file_offset and h.backing_file_offset < need_end:
            name = bytes(raw[h.backing_file_offset : h.backing_file_offset + h.backing_file_size])
            far = (cs - len(name)) & ~7
            if far < need_end or far < h.backing_file_offset + len(name):
                raise UnsupportedFeatureError(
                    "No room in the first cluster for the refcount mode header extension")
            st.pwrite(name, far, "header")
            st.sync()
            img._update_header(backing_file_offset=far)
        st.pwrite(bytes(need_end - pos - 8), pos + 8, "header")
        st.sync()
        st.pwrite(blob + bytes(8), pos, "header")
        st.sync()
    img.layout = read_layout(st)
    img.header = img.layout.header

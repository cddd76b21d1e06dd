"""Reading, validating and writing cluster 0 (header, extensions, backing file name)."""

from __future__ import annotations

from typing import Any

from .errors import FormatError, UnsupportedFeatureError
from .format import (
    COMPRESSION_NAMES,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    EXT_REFCOUNT_MODE,
    FEATURE_NAMES,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    INCOMPAT_KNOWN,
    INCOMPAT_REFCOUNT_MODES,
    MAX_BACKING_FILE_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_SIZE_BYTES,
    MAX_REFCOUNT_ORDER,
    MAX_REFTABLE_SIZE_BYTES,
    MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
    OUR_FEATURE_NAMES,
    REFCOUNT_MODE_BITS,
    REFCOUNT_MODE_IDS,
    V2_HEADER_LENGTH,
    Header,
    HeaderExtension,
    ImageLayout,
    RefcountModeExt,
    pack_feature_table,
    unpack_extensions,
    unpack_feature_table,
)
from .geometry import div_round_up
from .storage import Storage

MAX_HOST_OFFSET = 1 << 56


def _feature_list(bits: int, ftype: int, table: dict[tuple[int, int], str]) -> str:
    names = []
    for bit in range(64):
        if bits & (1 << bit):
            names.append(table.get((ftype, bit)) or f"Unknown incompatible feature: {1 << bit:x}")
    return ", ".join(names)


def read_layout(storage: Storage, allow_encrypted: bool = False,
                lenient: bool = False) -> ImageLayout:
    """Parse and validate cluster 0 of an image. allow_encrypted: for checking, which
    needs only the (never encrypted) metadata of AES or LUKS images. lenient: for
    checking too: tables past the end of the file or on the header are what check
    reports (as qemu-img check does), not a reason to refuse the image."""
    file_size = storage.size()
    head = storage.pread(min(max(file_size, 0), 4096), 0) if file_size else b""
    if len(head) < 4 or head[:4] != b"QFI\xfb":
        raise FormatError("Image is not in qcow2 format")
    if file_size < V2_HEADER_LENGTH:
        raise FormatError("Image is truncated: the qcow2 header is incomplete")
    # version and cluster_bits come first so we can size the read of cluster 0
    import struct

    version, = struct.unpack_from(">I", head, 4)
    if version not in (2, 3):
        raise UnsupportedFeatureError(f"Unsupported qcow2 version {version}")
    cluster_bits, = struct.unpack_from(">I", head, 20)
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    if version == 3 and len(head) >= 104 and struct.unpack_from(">I", head, 100)[0] > cluster_size:
        # before parsing: a header "longer than the file" is really an invalid length
        raise FormatError("qcow2 header exceeds cluster size")
    cluster0 = storage.pread(cluster_size, 0)[: max(min(file_size, cluster_size), 0)]
    h = Header.unpack(cluster0)
    if h.version == 3 and h.header_length > cluster_size:
        raise FormatError("qcow2 header exceeds cluster size")
    if h.refcount_order > MAX_REFCOUNT_ORDER:
        raise FormatError("Reference count entry width too large; may not exceed 64 bits")

    # extensions: from the end of the header to the backing name (or cluster end)
    ext_end = cluster_size
    if h.backing_file_offset:
        if h.backing_file_offset > cluster_size or h.backing_file_size > MAX_BACKING_FILE_NAME \
                or h.backing_file_offset + h.backing_file_size > cluster_size:
            raise FormatError("Backing file name too long or not inside the first cluster")
        ext_end = h.backing_file_offset
    ext_start = h.header_length if h.version == 3 else V2_HEADER_LENGTH
    exts: list[HeaderExtension] = []
    if ext_start + 8 <= min(ext_end, len(cluster0)):
        exts = unpack_extensions(cluster0, ext_start, min(ext_end, len(cluster0)))
    feature_table: dict[tuple[int, int], str] = {}
    backing_format = data_file = None
    bitmaps = crypto = None
    mode_ext: RefcountModeExt | None = None
    unknown: list[HeaderExtension] = []
    for e in exts:
        if e.type == EXT_BACKING_FORMAT:
            backing_format = e.data.decode("utf-8", "replace")
        elif e.type == EXT_FEATURE_TABLE:
            feature_table = unpack_feature_table(e.data)
        elif e.type == EXT_BITMAPS:
            bitmaps = e.data
        elif e.type == EXT_CRYPTO:
            crypto = e.data
        elif e.type == EXT_DATA_FILE:
            data_file = e.data.decode("utf-8", "replace")
        elif e.type == EXT_REFCOUNT_MODE:
            mode_ext = RefcountModeExt.unpack(e.data)
        else:
            unknown.append(e)

    unknown_incompat = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown_incompat:
        names = _feature_list(unknown_incompat, 0, feature_table)
        raise UnsupportedFeatureError(f"Unsupported qcow2 feature(s): {names}")
    if h.incompatible_features & INCOMPAT_DATA_FILE:
        raise UnsupportedFeatureError("Unsupported qcow2 feature(s): external data file")
    if allow_encrypted and h.crypt_method == 2 and crypto is None:
        raise FormatError("LUKS encrypted image without its crypto header extension")
    if h.crypt_method and not (allow_encrypted and h.crypt_method in (1, 2)):
        raise UnsupportedFeatureError(
            f"Unsupported encryption method: {h.crypt_method} (encrypted images are not supported)"
        )
    mode_bits = h.incompatible_features & INCOMPAT_REFCOUNT_MODES
    if mode_bits:
        want = {bit: REFCOUNT_MODE_IDS[name] for name, bit in REFCOUNT_MODE_BITS.items()}
        if mode_bits not in want:
            raise FormatError("More than one refcount mode bit is set")
        if mode_ext is None or mode_ext.mode_id != want[mode_bits]:
            raise FormatError("Refcount mode bit set without a matching refcount mode extension")
        if mode_ext.version != 1:
            raise UnsupportedFeatureError(
                f"Unsupported refcount mode extension version {mode_ext.version}")
    has_ctype_bit = bool(h.incompatible_features & INCOMPAT_COMPRESSION)
    if has_ctype_bit != (h.compression_type != 0):
        raise FormatError(
            "Compression type and its incompatible feature bit disagree"
            if has_ctype_bit or h.compression_type else "Invalid compression type"
        )
    if h.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeatureError(f"Unknown compression type {h.compression_type}")
    if h.incompatible_features & INCOMPAT_EXTL2 and cluster_bits < 14:
        raise FormatError("Extended L2 entries need a cluster size of at least 16 KiB")

    backing_file = None
    if h.backing_file_offset:
        raw = cluster0[h.backing_file_offset : h.backing_file_offset + h.backing_file_size]
        backing_file = bytes(raw).decode("utf-8", "replace")

    _validate_tables(h, -1 if lenient else file_size)
    return ImageLayout(
        header=h, backing_file=backing_file, backing_format=backing_format, data_file=data_file,
        feature_table=feature_table, bitmaps_ext=bitmaps, crypto_ext=crypto,
        refcount_mode_ext=mode_ext, unknown_extensions=tuple(unknown),
    )


def _validate_tables(h: Header, file_size: int) -> None:
    """Limits and alignment; with file_size >= 0 also the place of each table (inside
    the file, off the header)."""
    cs = h.cluster_size
    ext = bool(h.incompatible_features & INCOMPAT_EXTL2)
    l2_bits = h.cluster_bits - (4 if ext else 3)
    if h.size > (1 << 63) - 1:
        raise FormatError("Image size is too large")
    need_l1 = div_round_up(h.size, 1 << (h.cluster_bits + l2_bits))
    if h.l1_size * 8 > MAX_L1_SIZE_BYTES:
        raise FormatError("Active L1 table too large")
    if h.l1_size < need_l1:
        raise FormatError("L1 table is too small for the virtual size")
    if h.l1_size:
        _check_table("L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    if h.refcount_table_clusters == 0:
        raise FormatError("Image does not contain a reference count table")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_SIZE_BYTES:
        raise FormatError("Reference count table too large")
    _check_table("Reference count table", h.refcount_table_offset,
                 h.refcount_table_clusters * cs, cs, file_size)
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise FormatError("Too many snapshots")
    if h.nb_snapshots:
        _check_table("Snapshot table", h.snapshots_offset, h.nb_snapshots * 40, cs, file_size)


def _check_table(what: str, offset: int, nbytes: int, cs: int, file_size: int) -> None:
    if offset % cs:
        raise FormatError(f"{what} offset invalid: {offset:#x} is not cluster aligned")
    if offset + nbytes > MAX_HOST_OFFSET:
        raise FormatError(f"{what} offset invalid: {offset:#x} is beyond the host offset limit")
    if file_size < 0:  # lenient: check reports where the table is
        return
    if offset == 0:
        raise FormatError(f"{what} offset invalid: it overlaps the header")
    if offset + nbytes > MAX_HOST_OFFSET or offset + nbytes > max(file_size, 0):
        if offset >= file_size:
            raise FormatError(f"{what} offset invalid: {offset:#x} is past the end of the file")
        if offset + nbytes > file_size:
            raise FormatError(f"{what} is truncated: it runs past the end of the file")


def pack_cluster0(layout: ImageLayout, cluster_size: int, feature_table: bool = True) -> bytes:
    """Header, extensions and backing file name, as QEMU lays them out (feature_table:
    with the feature name table, which is optional)."""
    h = layout.header
    out = bytearray(h.pack())
    if h.version == 3:
        exts: list[HeaderExtension] = []
        if layout.backing_format:
            exts.append(HeaderExtension(EXT_BACKING_FORMAT, layout.backing_format.encode()))
        if layout.data_file:
            exts.append(HeaderExtension(EXT_DATA_FILE, layout.data_file.encode()))
        if layout.crypto_ext is not None:
            exts.append(HeaderExtension(EXT_CRYPTO, layout.crypto_ext))
        names = FEATURE_NAMES
        if layout.refcount_mode_ext is not None:
            names = {**FEATURE_NAMES, **OUR_FEATURE_NAMES}
        if feature_table:
            exts.append(HeaderExtension(EXT_FEATURE_TABLE, pack_feature_table(names)))
        if layout.bitmaps_ext is not None:
            exts.append(HeaderExtension(EXT_BITMAPS, layout.bitmaps_ext))
        if layout.refcount_mode_ext is not None:
            exts.append(HeaderExtension(EXT_REFCOUNT_MODE, layout.refcount_mode_ext.pack()))
        exts.extend(layout.unknown_extensions)
        for e in exts:
            out += e.pack()
        out += b"\0" * 8
    elif layout.backing_format:
        out += HeaderExtension(EXT_BACKING_FORMAT, layout.backing_format.encode()).pack()
        out += b"\0" * 8
    if layout.backing_file:
        name = layout.backing_file.encode()
        if len(name) > MAX_BACKING_FILE_NAME:
            raise FormatError("Backing file name too long")
        if len(out) + len(name) > cluster_size:
            raise FormatError("Header extensions and backing file name do not fit in the first cluster")
        offset = len(out)
        out += name
        h2 = h.with_(backing_file_offset=offset, backing_file_size=len(name))
        out[: len(h2.pack())] = h2.pack()
    if len(out) > cluster_size:
        raise FormatError("Header extensions do not fit in the first cluster")
    return bytes(out)


# ------------------------------------------------------------------ rewriting --
SECTOR = 512
_KEEP: object = object()


def extension_area(raw: bytes, h: Header) -> tuple[list[HeaderExtension], int]:
    """The header extensions of cluster 0 (raw) in their on-disk order, and the end of
    the area they use (past the end marker)."""
    start = h.header_length if h.version == 3 else V2_HEADER_LENGTH
    end = h.backing_file_offset if h.backing_file_offset else len(raw)
    if start + 8 > end:  # (as read_layout: no room for even an end marker)
        return [], start
    exts = unpack_extensions(raw, start, end)
    return exts, start + sum(len(e.pack()) for e in exts) + 8


def _backing_name(raw: bytes, h: Header) -> bytes:
    if not h.backing_file_offset:
        return b""
    return bytes(raw[h.backing_file_offset : h.backing_file_offset + h.backing_file_size])


def _sectors_of(ranges: list[tuple[int, int]]) -> set[int]:
    return {s for a, b in ranges if b > a for s in range(a // SECTOR, (b - 1) // SECTOR + 1)}


def _pack_head(h: Header, exts: list[HeaderExtension]) -> bytes:
    out = bytearray(h.pack())
    for e in exts:
        out += e.pack()
    return bytes(out + bytes(8))


def write_cluster0(img: Any, header: Header | None = None,
                   exts: list[HeaderExtension] | None = None,
                   backing_file: bytes | None | object = _KEEP) -> None:
    """The one writer of cluster 0 after creation: the fixed header, the extensions (in
    the order given; default: as on disk) and the backing file name (bytes, None for
    none; default: kept), switched so that a power cut, tearing any write into any
    subset of its 512-byte sectors, leaves the old cluster 0 or the new one.

    The sectors that change are written so that at most one of them is one the old
    header reads (header, extension area, backing name): the others first (the old
    header does not look at them), a sync, then that one sector, the atomic switch.
    Where more than one read sector changes (an extension removed or grown in the
    middle, the header and a later extension together), it goes through an
    intermediate cluster 0 that lives in the first sector alone: the new header and
    extensions without the (informational) feature name table, the backing name in
    that sector too or copied to the end of the cluster first. That sector is the
    first switch; the new layout's other sectors (which it does not read) follow; the
    new first sector is the second switch."""
    st = img.storage
    old_h: Header = img.header
    cs = old_h.cluster_size
    old = bytes(st.pread(cs, 0)).ljust(cs, b"\0")
    old_exts, old_ext_end = extension_area(old, old_h)
    old_name = _backing_name(old, old_h)
    h = old_h if header is None else header
    new_exts = old_exts if exts is None else list(exts)
    if h.version < 3:
        new_exts = [e for e in new_exts if e.type not in (EXT_FEATURE_TABLE, EXT_BITMAPS,
                                                           EXT_CRYPTO, EXT_REFCOUNT_MODE)]
    name = old_name if backing_file is _KEEP else (backing_file or b"")
    assert isinstance(name, bytes)
    if len(name) > MAX_BACKING_FILE_NAME:
        raise FormatError("Backing file name too long")
    old_used = [(0, old_ext_end)]
    if old_name:
        old_used.append((old_h.backing_file_offset, old_h.backing_file_offset + len(old_name)))

    head_len = len(_pack_head(h, new_exts))
    if name and name == old_name and old_h.backing_file_offset >= head_len:
        name_off = old_h.backing_file_offset  # stays where it is
    else:
        name_off = head_len
    if head_len > cs or (name and name_off + len(name) > cs):
        raise UnsupportedFeatureError(
            "Header extensions and backing file name do not fit in the first cluster")
    h = h.with_(backing_file_offset=name_off if name else 0, backing_file_size=len(name))
    target = bytearray(old)
    for a, b in old_used:  # what only the old layout used becomes zeros (dead)
        target[a:b] = bytes(b - a)
    target[:head_len] = _pack_head(h, new_exts)
    target[name_off : name_off + len(name)] = name
    top = max(b for _, b in [*old_used, (head_len, head_len), (name_off, name_off + len(name))])

    def changed(cur: bytes | bytearray) -> list[int]:
        return [s for s in range(-(-top // SECTOR))
                if target[s * SECTOR : (s + 1) * SECTOR] != cur[s * SECTOR : (s + 1) * SECTOR]]

    diff = changed(old)
    read = _sectors_of(old_used)
    if len([s for s in diff if s in read]) <= 1:
        _write_sectors(st, target, [s for s in diff if s not in read])
        _switch(st, target, old, [s for s in diff if s in read])
    else:
        # the intermediate layout, in the first sector alone
        mid_exts = [e for e in new_exts if e.type != EXT_FEATURE_TABLE]
        mid_len = len(_pack_head(h, mid_exts))
        far = 0
        if name and mid_len + len(name) > SECTOR:
            far = (cs - len(name)) & ~7
            if far < -(-top // SECTOR) * SECTOR:
                far = 0
        if mid_len > SECTOR or (name and mid_len + len(name) > SECTOR and not far):
            raise UnsupportedFeatureError(
                "Cannot change the header extensions crash-safely: they do not fit in "
                "the first sector without the feature name table")
        cur = bytearray(old)
        if far:
            cur[far : far + len(name)] = name
            target[far : far + len(name)] = name  # (dead for the new layout)
            _write_sectors(st, cur, list(range(far // SECTOR, (far + len(name) - 1) // SECTOR + 1)))
        mid_off = far or mid_len
        mid = bytearray(target[:SECTOR])
        mh = h.with_(backing_file_offset=mid_off if name else 0)
        mid[:mid_len] = _pack_head(mh, mid_exts)
        if name and not far:
            mid[mid_off : mid_off + len(name)] = name
        _switch(st, mid + cur[SECTOR:], cur, [0])
        cur[:SECTOR] = mid
        # the intermediate layout is live: should what follows fail, the image goes
        # on from it (the new header and extensions, less the feature names)
        img.layout = read_layout(st)
        img.header = img.layout.header
        _write_sectors(st, target, [s for s in changed(cur) if s])
        _switch(st, target, mid + cur[SECTOR:], [0])
        if far:
            st.pwrite(bytes(len(name)), far, "header")  # the copy is dead now
            st.sync()
    layout = read_layout(st)
    img.layout = layout
    img.header = layout.header


def _runs(sectors: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in sorted(sectors):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def _write_sectors(st: Storage, buf: bytes | bytearray, sectors: list[int]) -> None:
    """Sectors the live layout does not read: written and made durable."""
    for a, b in _runs(sectors):
        st.pwrite(bytes(buf[a * SECTOR : b * SECTOR]), a * SECTOR, "header")
    if sectors:
        st.sync()


def _switch(st: Storage, new: bytes | bytearray, old: bytes | bytearray,
            sectors: list[int]) -> None:
    """The switch: one sector (none when nothing read changes). On an error the old
    sector is put back (as Image._update_header does): the caller sees the error and
    still believes in the old layout."""
    if not sectors:
        return
    (s,) = sectors
    lo, hi = s * SECTOR, (s + 1) * SECTOR
    st.pwrite(bytes(new[lo:hi]), lo, "header")
    try:
        st.sync()
    except Exception:
        try:
            st.pwrite(bytes(old[lo:hi]), lo, "header")
            st.sync()
        except Exception:
            pass  # the device keeps failing
        raise


def set_extension(img: Any, etype: int, data: bytes | None, **header_changes: int) -> None:
    """Add, replace (in its place) or remove (data None) one header extension, with
    changes of header fields (an autoclear bit, say) in the same crash-safe switch."""
    old_h: Header = img.header
    raw = bytes(img.storage.pread(old_h.cluster_size, 0)).ljust(old_h.cluster_size, b"\0")
    exts, _ = extension_area(raw, old_h)
    new = [e for e in exts if e.type != etype]
    if data is not None:
        at = next((i for i, e in enumerate(exts) if e.type == etype), len(new))
        new.insert(at, HeaderExtension(etype, data))
    header = old_h.with_(**header_changes) if header_changes else old_h
    if new == exts and header == old_h:
        return
    write_cluster0(img, header, new)

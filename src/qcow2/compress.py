"""Compressed cluster codecs (zlib raw deflate, zstd), with output bounded to one cluster."""

from __future__ import annotations

import io
import threading
import zlib

from .errors import CorruptImageError, UnsupportedFeatureError
from .format import COMPRESSION_ZLIB, COMPRESSION_ZSTD

try:
    import zstandard
except ImportError:  # pragma: no cover - zstandard is a declared dependency
    zstandard = None


def decompress_cluster(data: bytes, compression_type: int, cluster_size: int) -> bytes:
    """Decompress one cluster; never produces more than cluster_size bytes."""
    try:
        if compression_type == COMPRESSION_ZLIB:
            d = zlib.decompressobj(-15)
            out = d.decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            if zstandard is None:
                raise UnsupportedFeatureError("zstd support needs the 'zstandard' package")
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
            out = reader.read(cluster_size)
            while len(out) < cluster_size:
                more = reader.read(cluster_size - len(out))
                if not more:
                    break
                out += more
        else:
            raise UnsupportedFeatureError(f"Unknown compression type {compression_type}")
    except (zlib.error, ValueError, RuntimeError) as exc:
        if isinstance(exc, UnsupportedFeatureError):
            raise
        raise CorruptImageError(f"Compressed cluster cannot be decompressed: {exc}") from exc
    except Exception as exc:  # zstandard.ZstdError
        if zstandard is not None and isinstance(exc, zstandard.ZstdError):
            raise CorruptImageError(f"Compressed cluster cannot be decompressed: {exc}") from exc
        raise
    if len(out) != cluster_size:
        raise CorruptImageError("Compressed cluster does not decompress to a full cluster")
    return out


# one zstd compressor per thread (convert -c compresses in a pool): making one costs as
# much as compressing a cluster, and a compressor serves one thread at a time
_local = threading.local()


def compress_cluster(data: bytes | bytearray | memoryview, compression_type: int) -> bytes:
    if compression_type == COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()
    if compression_type == COMPRESSION_ZSTD:
        if zstandard is None:
            raise UnsupportedFeatureError("zstd support needs the 'zstandard' package")
        z = getattr(_local, "zstd", None)
        if z is None:
            z = _local.zstd = zstandard.ZstdCompressor()
        return z.compress(data)
    raise UnsupportedFeatureError(f"Unknown compression type {compression_type}")

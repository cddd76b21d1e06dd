"""Compressed cluster codecs (zlib raw deflate, zstd), with output bounded to one cluster."""

from __future__ import annotations

import io
import os
import threading
import zlib
from typing import Any

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


class CompressPipeline:
    """Clusters compressed in a thread pool (zlib and zstd release the GIL), written in
    the order they came in, so that they are packed exactly as one by one: put() hands
    a cluster over, a batch of them is one task (fewer hand-overs between threads), and
    the oldest batches whose compression is done are written once enough are in flight;
    drain() writes them all. write(guest offset, data, compressed data)."""

    BATCH = 8  # clusters per task

    def __init__(self, compression_type: int, cluster_size: int, threads: int | None,
                 write: Any) -> None:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.ctype = compression_type
        self.cs = cluster_size
        self.write = write
        n = threads or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(max_workers=n) if n > 1 else None
        self.limit = 2 * n  # batches in flight (bounded memory)
        self.batch: list[tuple[int, bytes | bytearray]] = []
        self.pending: deque[tuple[list[tuple[int, bytes | bytearray]], Any]] = deque()

    def _compress(self, batch: list[tuple[int, bytes | bytearray]]) -> list[bytes]:
        cs, ctype = self.cs, self.ctype
        # (a whole cluster goes to the codec as it is: no copy)
        return [compress_cluster(d if len(d) == cs else bytes(d).ljust(cs, b"\0"), ctype)
                for _at, d in batch]

    def _write(self, batch: list[tuple[int, bytes | bytearray]], comps: list[bytes]) -> None:
        for (at, data), comp in zip(batch, comps):
            self.write(at, data, comp)

    def put(self, offset: int, data: bytes | bytearray) -> None:
        self.batch.append((offset, data))
        if len(self.batch) < self.BATCH:
            return
        batch, self.batch = self.batch, []
        if self.pool is None:
            self._write(batch, self._compress(batch))
            return
        self.pending.append((batch, self.pool.submit(self._compress, batch)))
        while len(self.pending) > self.limit or (self.pending and self.pending[0][1].done()):
            done, fut = self.pending.popleft()
            self._write(done, fut.result())

    def drain(self) -> None:
        while self.pending:
            done, fut = self.pending.popleft()
            self._write(done, fut.result())
        batch, self.batch = self.batch, []
        if batch:
            self._write(batch, self._compress(batch))

    def close(self) -> None:
        self.pending.clear()
        self.batch = []
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

"""Geometry maths of a qcow2 image: pure functions of the header parameters."""

from __future__ import annotations

from dataclasses import dataclass

from .format import SUBCLUSTERS_PER_CLUSTER


def div_round_up(a: int, b: int) -> int:
    return -(-a // b)



@dataclass(frozen=True)
class Geometry:
    cluster_bits: int
    refcount_order: int
    extended_l2: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refcount_max(self) -> int:
        return (1 << self.refcount_bits) - 1

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l2_entries(self) -> int:
        return 1 << self.l2_bits

    @property
    def l1_coverage(self) -> int:
        """Bytes of virtual disk described by one L1 entry."""
        return 1 << (self.cluster_bits + self.l2_bits)

    @property
    def refblock_bits(self) -> int:
        """log2 of the number of refcount entries per refcount block."""
        return self.cluster_bits + 3 - self.refcount_order

    @property
    def refblock_entries(self) -> int:
        return 1 << self.refblock_bits

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else self.cluster_size

    # Compressed cluster descriptor: offset in bits 0..x-1, sector count in x..61
    @property
    def csize_shift(self) -> int:
        return 62 - (self.cluster_bits - 8)

    @property
    def csize_mask(self) -> int:
        return (1 << (self.cluster_bits - 8)) - 1

    @property
    def coffset_mask(self) -> int:
        return (1 << self.csize_shift) - 1

    def l1_size_for(self, virtual_size: int) -> int:
        return div_round_up(virtual_size, self.l1_coverage)

    def compressed_range(self, l2_entry: int) -> tuple[int, int]:
        """(host offset, byte length) of the compressed data an L2 entry describes."""
        host = l2_entry & self.coffset_mask
        nb_sectors = ((l2_entry >> self.csize_shift) & self.csize_mask) + 1
        end = (host & ~511) + nb_sectors * 512
        return host, end - host

    def compressed_descriptor(self, host: int, length: int) -> int:
        end = host + length
        nb_sectors = div_round_up(end, 512) - (host >> 9)
        return host | ((nb_sectors - 1) << self.csize_shift)

    def refcount_clusters_needed(self, nb_clusters: int) -> tuple[int, int]:
        """(refcount blocks, refcount table clusters) to describe nb_clusters host clusters
        including the refcount structures themselves."""
        blocks = table = 0
        while True:
            total = nb_clusters + blocks + table
            new_blocks = div_round_up(total, self.refblock_entries)
            new_table = div_round_up(new_blocks * 8, self.cluster_size)
            if new_blocks == blocks and new_table == table:
                return blocks, table
            blocks, table = new_blocks, new_table

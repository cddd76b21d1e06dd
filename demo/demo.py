"""Headline demonstration: create an image, write to it, show info and map, check it with qemu-img."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import qcow2


def main() -> None:
    work = tempfile.mkdtemp(prefix="qcow2-demo-")
    path = os.path.join(work, "demo.qcow2")
    qcow2.create(path, 1 << 30)
    with qcow2.open(path, "r+") as img:
        img.pwrite(b"hello qcow2 " * 10000, 0)
        img.write_zeroes(4 << 20, 1 << 20)
        img.pwrite(os.urandom(1 << 20), 8 << 20)
        print("stats:", img.stats)
        for extent in img.map():
            print(extent)
    if shutil.which("qemu-img"):
        print(subprocess.run(["qemu-img", "check", path], capture_output=True, text=True).stdout)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()

"""Consistency check and repair (owned by the check work; see issue 4)."""

from __future__ import annotations

from typing import Any


class CheckMixin:
    """check(repair=None|"leaks"|"all") method of Image."""


def check_image(img: Any, repair: str | None = None, from_dirty_open: bool = False) -> Any:
    from .errors import CorruptImageError

    raise CorruptImageError("Image is dirty; repairing dirty images is not implemented yet")

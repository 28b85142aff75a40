"""Images for the bwrap runtime: registry pulls, safe layer unpacking, a rootfs cache."""

from __future__ import annotations

from openhtc.runtimes.images.cache import ImageCache, PreparedImage
from openhtc.runtimes.images.oci import ImageConfig, ImageError, User, resolve_user

__all__ = ["ImageCache", "ImageConfig", "ImageError", "PreparedImage", "User", "resolve_user"]

"""Compression bombs: a few KiB on the wire that inflate to far more.

Built here once for the fault table both drivers run
(``tests/test_async_faults.py``): every single coding, and chains of them.
"""

from __future__ import annotations

import gzip
import importlib
import sys
import zlib
from collections.abc import Callable
from typing import Any

__all__ = ["BOMBS", "INFLATED", "MIB", "deflate", "gzip_data", "have"]

MIB = 1024 * 1024
INFLATED = 64 * MIB  # what each bomb inflates to


def _compress(
    compressor: Callable[[bytes], bytes], size: int, finish: Callable[[], bytes]
) -> bytes:
    block = bytes(MIB)
    return b"".join(compressor(block) for _ in range(size // MIB)) + finish()


def gzip_data(data: bytes) -> bytes:
    return gzip.compress(data)


def deflate(data: bytes) -> bytes:
    return zlib.compress(data, 9)


def _gzip_bomb(size: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    return _compress(z.compress, size, z.flush)


def _deflate_bomb(size: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 15)
    return _compress(z.compress, size, z.flush)


def _zstd_module() -> Any:
    if sys.version_info >= (3, 14):  # pragma: no cover - Python 3.14+
        return importlib.import_module("compression.zstd")
    return importlib.import_module("backports.zstd")


def have(module: str) -> bool:
    """Whether the codec library for a bomb is installed."""
    try:
        if module == "zstd":
            _zstd_module()
        else:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def _brotli_bomb(size: int) -> bytes:
    brotli = importlib.import_module("brotli")
    c = brotli.Compressor(quality=5)
    return _compress(c.process, size, c.finish)


def _zstd_bomb(size: int) -> bytes:
    c = _zstd_module().ZstdCompressor()
    return _compress(c.compress, size, c.flush)


#: name -> (Content-Encoding, library needed or "", builder of the bomb's bytes)
BOMBS: dict[str, tuple[str, str, Callable[[], bytes]]] = {
    "gzip": ("gzip", "", lambda: _gzip_bomb(INFLATED)),
    "deflate": ("deflate", "", lambda: _deflate_bomb(INFLATED)),
    "br": ("br", "brotli", lambda: _brotli_bomb(INFLATED)),
    "zstd": ("zstd", "zstd", lambda: _zstd_bomb(INFLATED)),
    # chained: applied in the order listed, so decoded from the last one back
    "gzip-gzip": ("gzip, gzip", "", lambda: gzip_data(_gzip_bomb(INFLATED))),
    "gzip-deflate": ("gzip, deflate", "", lambda: deflate(_gzip_bomb(INFLATED))),
}

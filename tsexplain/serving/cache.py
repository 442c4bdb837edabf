"""An LRU cache of explanations, bounded in bytes and entries (no TorchServe import).

Entries are stored as their compact JSON text, so the cache holds only bytes:
never a tensor, never autograd state, and a hit hands out a fresh copy that the
caller may change freely. See docs/design.md ("Explanation cache") for the key.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional, Union

SKIPPED_DIRS = {"__pycache__"}
# The key's target for a request that names none: "the class the model predicts". A string, so in the
# key's JSON it can never equal a class index (labels are resolved to indices before keying).
PREDICTED = "predicted"


def cache_key(data: bytes, model_version: str, method: str, target: Union[int, str], params: Mapping[str, Any]) -> str:
    """sha256 (hex) over everything an explanation depends on.

    Args:
        data: the input's bytes (image file bytes, UTF-8 text).
        model_version: see :func:`model_version`.
        method: the explanation method.
        target: the class index the request named, or :data:`PREDICTED` for a request
            that names none (the caller checks that a hit under it explains the class
            predicted now).
        params: every other setting or request field that changes the answer; values
            must be JSON-serialisable (lists, numbers, strings, None).
    """
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError("cache_key needs the input as bytes")
    if not (target == PREDICTED if isinstance(target, str) else isinstance(target, int) and not isinstance(target, bool)):
        raise TypeError(f"cache_key needs a class index or {PREDICTED!r} as the target")
    header = json.dumps(
        {"model": model_version, "method": method, "target": target, "params": params},
        sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
    )
    digest = hashlib.sha256(header.encode("ascii"))
    digest.update(b"\0")  # JSON text never holds a raw NUL: header and data cannot run into each other
    digest.update(data)
    return digest.hexdigest()


def fingerprint_files(root: os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 (hex) of every regular file under ``root`` (relative path and contents,
    in sorted order), skipping ``__pycache__`` folders and ``.pyc`` files.

    For a MAR's extracted folder this covers the weights, the tokenizer, the
    labels, the config and the handler code: any change gives a new fingerprint.
    """
    root = Path(root)
    digest = hashlib.sha256()
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for name in names:
            path = Path(folder) / name
            if not name.endswith(".pyc") and path.is_file() and not path.is_symlink():
                files.append(path)
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        relative = path.relative_to(root).as_posix().encode("utf-8")
        digest.update(len(relative).to_bytes(8, "big") + relative + path.stat().st_size.to_bytes(8, "big"))
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(chunk_bytes), b""):
                digest.update(block)
    return digest.hexdigest()


def model_version(manifest: Optional[Mapping[str, Any]], fingerprint: str) -> str:
    """``<MAR model version>+<first 16 hex digits of the fingerprint>``."""
    version = ((manifest or {}).get("model") or {}).get("modelVersion", "")
    return f"{version}+{fingerprint[:16]}"


class ExplanationCache:
    """Least-recently-used explanations, at most ``max_bytes`` and ``max_entries``.

    The size of an entry is ``sys.getsizeof`` of its stored JSON bytes plus that of
    its key; an entry larger than ``max_bytes`` on its own is not stored.
    ``max_bytes == 0`` or ``max_entries == 0`` disables the cache. Thread-safe.

    Values must be JSON-serialisable (``json.dumps`` raises ``TypeError`` on a
    tensor): the cache holds text, never model state.
    """

    def __init__(self, max_bytes: int, max_entries: int):
        if max_bytes < 0 or max_entries < 0:
            raise ValueError("cache bounds must be non-negative")
        self.max_bytes = int(max_bytes)
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Optional[dict]:
        """A fresh copy of the stored explanation, or None (counted as a hit or a miss)."""
        if not self.enabled:
            return None
        with self._lock:
            stored = self._entries.get(key)
            if stored is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        return json.loads(stored)

    def reject(self) -> None:
        """Count the last hit as a miss: the caller could not use it (an entry under
        :data:`PREDICTED` that explains another class than the one predicted now)."""
        with self._lock:
            self.hits -= 1
            self.misses += 1

    def put(self, key: str, value: Mapping[str, Any]) -> bool:
        """Store ``value`` under ``key``, evicting the least recently used entries
        until both bounds hold. Returns False when it is not stored (too large, or disabled)."""
        if not self.enabled:
            return False
        stored = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode("utf-8")
        size = sys.getsizeof(stored) + sys.getsizeof(key)
        if size > self.max_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._drop(key)
            while self._entries and (self.bytes + size > self.max_bytes or len(self._entries) >= self.max_entries):
                self._drop(next(iter(self._entries)))
            self._entries[key] = stored
            self._sizes[key] = size
            self.bytes += size
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sizes.clear()
            self.bytes = 0

    def _drop(self, key: str) -> None:
        del self._entries[key]
        self.bytes -= self._sizes.pop(key)

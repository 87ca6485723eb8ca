"""A pyarrow filesystem wrapper that records every path it is asked about (a FileSelector: its base_dir), for
tests that check a registry never touches a path outside its root."""

from __future__ import annotations


class SpyFS:
    def __init__(self, fs):
        self._fs, self.paths = fs, []

    def __getattr__(self, attr):
        real = getattr(self._fs, attr)
        if not callable(real):
            return real

        def call(*args, **kwargs):
            for a in args:
                items = a if isinstance(a, list) else [a]
                self.paths += [getattr(i, "base_dir", i) for i in items if isinstance(i, str) or hasattr(i, "base_dir")]
            return real(*args, **kwargs)
        return call

"""Names imported on first use, for the command line's start-up.

``tilesweep query "select 1"`` should not import numpy, shapely, the tile store or the
simulator just because other commands of the same program use them: on a 2-core notebook
those imports were most of a second before any work began. A module binds such a name as
``Sweep = LazyName("tilesweep.sweep", "Sweep")``; calling it or reading an attribute
(``Sweep.open(...)``) imports the module then, once.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class LazyName:
    """``module.name``, imported when first called or when an attribute is read."""

    def __init__(self, module: str, name: str) -> None:
        self._module = module
        self._name = name
        self._value: Any = None

    def resolve(self) -> Any:
        """The object itself (importing its module if that has not happened yet)."""
        if self._value is None:
            self._value = getattr(importlib.import_module(self._module), self._name)
        return self._value

    def if_imported(self) -> Any:
        """The object if its module is imported already, else ``()``: for an ``except``
        clause (``except Lazy.if_imported() as exc``), which matches nothing when the
        module that raises the exception was never imported, so it could not have."""
        mod = sys.modules.get(self._module)
        return getattr(mod, self._name) if mod is not None else ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # not the object's private names, nor copy/pickle probes
            raise AttributeError(attr)
        return getattr(self.resolve(), attr)

    def __repr__(self) -> str:
        return f"<lazy {self._module}.{self._name}>"

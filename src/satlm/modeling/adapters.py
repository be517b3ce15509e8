"""The names of satlm 0.1, kept for its callers: the family table is modeling/families.py.

ADAPTERS maps each supported model class name to its family's Layout."""

from __future__ import annotations

from .families import (FAMILIES, Layout, UnsupportedModelError, get_path, layout_for,  # noqa: F401
                       model_module_function)

SATAdapter = Layout
ADAPTERS: dict[str, Layout] = {cls: layout for layout in FAMILIES.values() for cls in layout.classes}


def adapter_for(model):
    return layout_for(model)

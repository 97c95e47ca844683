"""Stub ``torchvision`` modules, so that timm imports where torchvision cannot (tests only).

timm imports torchvision names when it is imported (``from torchvision.ops.misc import
FrozenBatchNorm2d``, transforms, ...), but the model code the zoo runs (``timm.create_model``
of its ``test_*`` models, forward and backward) never calls them. torchvision is a compiled
package tied to one torch build: it is absent here, or cannot load beside a CPU-only torch.
:func:`import_timm` then serves stand-ins for ``torchvision.*`` while timm is imported:
each module's attributes are classes that can be named, subclassed and used in
``isinstance``, but raise if called. The stand-ins are taken out of ``sys.modules`` again
afterwards, so that nothing else in the session sees a torchvision that is not there.

This file belongs to the tests and is never shipped in the ``fimhooks`` package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types


def _stand_in(owner, name: str):
    """A new ``_Anything`` named ``name``, kept on ``owner`` (dunder names are not stood in)."""
    if name.startswith("__"):
        raise AttributeError(name)
    value = _Anything(name, (), {})
    setattr(owner, name, value)
    return value


class _Anything(type):
    """A class whose every attribute is another such class; calling one raises."""

    def __getattr__(cls, name):
        return _stand_in(cls, name)

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {cls.__name__} is not callable in the tests")


class _Module(types.ModuleType):
    """A stand-in module (and package): any name it is asked for is an ``_Anything``."""

    __path__ = []

    def __getattr__(self, name):
        return _stand_in(self, name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and every ``torchvision.*`` as a ``_Module``."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Module(spec.name)

    def exec_module(self, module):
        pass


def _torchvision_names():
    return [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]


def import_timm():
    """``import timm``, with the stand-ins only if ``import torchvision`` fails."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or built for another torch
        for name in _torchvision_names():  # what a failed import left behind
            del sys.modules[name]
    else:
        return importlib.import_module("timm")
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm")
    finally:
        sys.meta_path.remove(finder)
        for name in _torchvision_names():
            del sys.modules[name]

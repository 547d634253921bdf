"""How a step that evaluates its closure more than once calls it.

A closure from a plain training loop computes a loss and its gradient; calling it twice
is harmless. A framework's closure can do more: Lightning's runs ``training_step``, which
logs, updates metric objects and BatchNorm statistics and draws random numbers. A
framework registers an adapter for its closures, looked up by the package that made the
closure and imported only when such a closure reaches a step, so this layer imports no
framework (the package root registers the Lightning one)."""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable, ContextManager, Iterator

__all__ = ["Adapter", "closure_calls", "register_closure_adapter"]

# (optimizer, closure) -> a context that yields the callable to call once per evaluation
Adapter = Callable[[Any, Callable[[], Any]], ContextManager[Callable[[], Any]]]

_ADAPTERS: dict[str, Adapter | str] = {}


def register_closure_adapter(package: str, adapter: Adapter | str) -> None:
    """Adapts the closures made by ``package`` (a top-level package name, e.g.
    ``"lightning"``). ``adapter`` is the callable or its ``"module:name"`` path,
    imported at the first such closure."""
    _ADAPTERS[package] = adapter


def _maker(closure: Callable[[], Any]) -> str:
    """The top-level package of the code that made ``closure`` (for a bound method or a
    partial of one, the class of the object it is bound to)."""
    fn = closure.func if isinstance(closure, functools.partial) else closure
    owner = getattr(fn, "__self__", None)
    module = type(owner).__module__ if owner is not None else getattr(fn, "__module__", None)
    return (module or type(fn).__module__ or "").partition(".")[0]


@contextlib.contextmanager
def closure_calls(optimizer: Any, closure: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
    """The callable a multi-evaluation step calls once per gradient evaluation: the
    closure itself, or its framework's adapter's."""
    package = _maker(closure)
    adapter = _ADAPTERS.get(package)
    if adapter is None:
        yield closure
        return
    if isinstance(adapter, str):
        module, _, name = adapter.partition(":")
        adapter = _ADAPTERS[package] = getattr(importlib.import_module(module), name)
    with adapter(optimizer, closure) as calls:
        yield calls

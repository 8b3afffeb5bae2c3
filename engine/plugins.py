"""Resolve user transforms named in config into Beam PTransforms.

A plugin is a ``beam.PTransform`` from ``PCollection[pa.RecordBatch]`` to
``PCollection[pa.RecordBatch]``, named in ``[pipeline] plugins`` either as
``"package.module:attr"`` or as the name of an entry point in the group
``headrace.transforms``. ``attr`` may be a PTransform instance, a PTransform subclass, or a
zero-argument factory returning one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect

import apache_beam as beam

from engine.errors import PluginError

__all__ = ["ENTRY_POINT_GROUP", "load_plugin", "load_plugins"]

ENTRY_POINT_GROUP = "headrace.transforms"


def _entry_point(name: str):
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep
    return None


def _resolve_object(spec: str):
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(
                f"plugin {spec!r}: cannot import module {module_name!r}: {exc}. "
                f"Is it installed or on PYTHONPATH?"
            ) from None
        for part in attr_path.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise PluginError(f"plugin {spec!r}: module {module_name!r} has no attribute {attr_path!r}") from None
        return obj
    ep = _entry_point(spec)
    if ep is None:
        known = sorted(e.name for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        raise PluginError(
            f"plugin {spec!r}: not 'module:attr' and no entry point of that name in group "
            f"{ENTRY_POINT_GROUP!r} (registered: {known or 'none'})"
        )
    try:
        return ep.load()
    except Exception as exc:  # a user's package failing to import: report it as a plugin error
        raise PluginError(f"plugin {spec!r}: entry point {ep.value!r} failed to load: {exc!r}") from exc


def load_plugin(spec: str) -> beam.PTransform:
    """Return the PTransform a config entry names; PluginError with a fix if it can't."""
    obj = _resolve_object(spec)
    if isinstance(obj, beam.PTransform):
        return obj
    if callable(obj):
        try:
            sig = inspect.signature(obj)
            required = [p for p in sig.parameters.values()
                        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            required = []
        if required:
            raise PluginError(
                f"plugin {spec!r}: {obj!r} needs arguments {[p.name for p in required]}; give them "
                f"defaults or point the config at a module-level instance"
            )
        made = obj()
        if isinstance(made, beam.PTransform):
            return made
        raise PluginError(f"plugin {spec!r}: calling {obj!r} returned {type(made).__name__}, not a beam.PTransform")
    raise PluginError(f"plugin {spec!r}: {obj!r} is not a beam.PTransform (instance, subclass or factory)")


def load_plugins(specs: tuple[str, ...] | list[str]) -> list[tuple[str, beam.PTransform]]:
    """Load every configured plugin, in order, as (label, transform) pairs."""
    return [(spec, load_plugin(spec)) for spec in specs]

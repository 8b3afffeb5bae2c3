"""Errors raised by ``transforms``: schema and filter validation, id mappings, user plugins.

None of them is retriable: each needs a change of config, mapping files or plugin code.
Exit codes are decided by ``engine.errors``.
"""

from __future__ import annotations

__all__ = ["TransformError", "TransformConfigError", "MappingError", "PluginError"]


class TransformError(Exception):
    """Base of the errors ``transforms`` raises on purpose."""

    retriable: bool = False


class TransformConfigError(TransformError):
    """A schema, filter or hash setting cannot be applied (a filter clause outside the
    grammar, a feature compared with the wrong type); the message names the key."""


class MappingError(TransformError):
    """An id mapping cannot be fitted, loaded or applied."""


class PluginError(TransformError):
    """A user transform cannot be loaded, has the wrong type, or broke the batch schema."""

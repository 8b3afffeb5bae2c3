"""Examples shipped with headrace: configs and a user plugin (``examples.plugins``)."""

__all__ = ["plugins"]

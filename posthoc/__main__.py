"""``python -m posthoc``: the same as the ``posthoc`` command."""

from .cli import entrypoint

entrypoint()

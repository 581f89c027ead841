"""Allow ``python -m reconciler.sandbox`` (the same command as ``reconciler sandbox``)."""

from reconciler.sandbox.cli import sandbox

sandbox()

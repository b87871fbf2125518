"""Placeholder: registers no commands yet."""


def register(sub) -> None:
    """Add this group's subcommands to the ``streams`` parser."""

"""Command groups beyond the core stages; each module has ``register(subparsers)``.

- ``privacy``: keys, reveal (masking key management and supervised recovery)
- ``operations``: replay, status, dlq (reprocessing and inspection)
"""

"""Data: seqio tasks, TFDS tasks, bundled digits, curricula."""

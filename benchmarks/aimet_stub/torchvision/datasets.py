"""Stand-in (see transforms.py)."""

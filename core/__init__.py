"""The floor every package stands on: errors, settings and the ML-100K readers.

Nothing here imports anything else of the project (``tests/test_layers.py``).
"""

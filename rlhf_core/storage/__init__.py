"""Persistence: the SQLite store of cases, traces, rankings, updates and checkpoints (the
store itself imports no torch), and its exports and imports."""

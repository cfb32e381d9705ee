"""Worked examples of the simulator's plug-ins: one per kind (docs/own-components.md)."""

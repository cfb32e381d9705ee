"""Scenario YAML files, shipped as package data; see ``sim.config``."""

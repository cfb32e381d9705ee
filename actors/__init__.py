"""Attackers and benign users: pure, stepwise query sources plus the Ray actor that drives them."""

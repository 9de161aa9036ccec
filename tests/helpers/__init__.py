"""Test helpers: the float64 reference of the formulas and shared tools (not tests)."""

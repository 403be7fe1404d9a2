"""Helpers shared by the unit, integration and fuzz tests."""

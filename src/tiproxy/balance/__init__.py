"""Choosing backends for sessions."""

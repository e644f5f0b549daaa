"""Shipped head-class configs (JSON data)."""

"""Test support shared by several tests (not product code)."""

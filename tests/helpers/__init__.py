"""Test helpers shared by unit, end-to-end and GPU tests."""

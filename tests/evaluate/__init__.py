"""Tests of stl.evaluate."""

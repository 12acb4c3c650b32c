"""Tests of stl.report."""

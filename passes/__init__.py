"""Compiler passes over a captured program: labelling, attention decomposition, protection
(taint, RNM, field arithmetic, linearity and corrections, mask rewrite, Freivalds, cost) and
the audit. Each module's docstring says what it reads, what it writes and what it guarantees.
Layer rule (``docs/design.md``): passes import the data layer (``partitioner.plan`` and the
modules below it) and nothing above it.
"""

"""Fault injection and hostile inputs: each test feeds mmretrieve something that broke it once (or could),
and asserts what it does now. Every test here carries the ``reliability`` marker; they run by default."""

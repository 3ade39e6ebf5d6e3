"""Frozen-feature evaluations: features extracted once, then a weighted kNN and a linear probe."""

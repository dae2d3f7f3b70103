"""Exact and near (MinHash LSH + distributed connected components) deduplication."""

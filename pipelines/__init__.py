"""Corpus curation on Ray Data: read, normalize, filter, dedup, tokenize, pack, write."""

"""The recipes that ship with raylm, installed as the package data of `raylm.recipes` (pyproject.toml).

`raylm recipes` lists them (the first line of each file's leading comment is its description),
`raylm init NAME` copies one to edit, and any verb takes a shipped name in place of a path.
"""

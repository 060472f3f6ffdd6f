"""Filesystem side of ckptdb: path naming, hashing, writing and reading step directories.

Nothing here talks to the catalog; the manager records what this package reports.
"""

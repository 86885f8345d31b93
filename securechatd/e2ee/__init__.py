"""The end-to-end layer the client library uses: pure functions over bytes, no Twisted, no I/O.

docs/E2EE.md is its specification; tests/vectors/ holds its golden vectors.
"""

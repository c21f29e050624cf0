"""The execution core of tdpu. Imports neither Textual nor Rich (see tests/test_layering.py)."""

"""The files of this folder are not tests: tests/test_doc_blocks.py runs each one before the
python blocks of its page. Pytest must not import them (``--doctest-modules`` would, and a
file named after a framework, such as ``torch.py``, would shadow it)."""

collect_ignore_glob = ["*.py"]

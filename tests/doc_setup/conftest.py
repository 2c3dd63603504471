"""The files of this folder are not tests: tests/test_doc_blocks.py runs each one before the
python blocks of its page. Pytest must not import them (``--doctest-modules`` would). The
folder is a package (``__init__.py``), so that pytest's ``prepend`` import mode puts the
repository root on ``sys.path``, never this folder, whose ``torch.py`` and ``optax.py`` would
otherwise shadow the frameworks."""

collect_ignore_glob = ["*.py"]

"""Setup code for the python blocks of docs pages (see tests/test_doc_blocks.py); not tests."""

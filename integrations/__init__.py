"""Framework adapters for gradwatch, imported as ``gradwatch.integrations.<name>``.

Each adapter is a thin layer that decides *when* to measure; the measuring lives in :mod:`gradwatch`.
"""

"""Everything about recorded runs that needs no Sacred: which database, how series are kept
small, reading file-observer runs, loading them into MongoDB, comparing and re-running runs.
"""

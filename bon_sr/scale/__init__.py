"""Scaling out on engines users already run: a Ray Data pipeline of ``BestOfN`` replicas.

``ray_data`` holds the pipeline (no progress bars, no files); ``cli`` is the driver loop of
``bon-sr generate --ray`` (writes the JSONL, draws progress). Importing this package does
not import Ray: only running the pipeline does.
"""

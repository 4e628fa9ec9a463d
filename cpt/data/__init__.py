"""Data: readers (txt/jsonl/parquet/datasets) → tokenizer → cached token files → task streams."""

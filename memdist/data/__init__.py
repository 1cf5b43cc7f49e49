"""Built-in data: synthetic factual corpus, byte tokenizer, Parquet streaming."""

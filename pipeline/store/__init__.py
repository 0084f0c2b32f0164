"""Storage of results: resumable Parquet shards, cell codecs, and the digests that key resumable work."""

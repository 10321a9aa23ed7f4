"""What a run hands back: records and the summary, JSON / JSONL / CSV, schema-checked documents,
shards and their merge, CI outputs, plots, the HTML page and every file written. No torch."""

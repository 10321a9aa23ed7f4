"""The local statistic: each image's most unusual patch against banks of normal patches, at the working
size (`patches`) and, for large files, on tiles at the file's own detail (`tiles`). No torch."""

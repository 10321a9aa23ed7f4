"""Images: finding files, decoding them safely, the pixel cache, batches in bounded memory, and what is
measured of each image where it is decoded (properties a person can name, duplicate fingerprints).
No torch, and nothing of models: the decode workers import only this wing."""

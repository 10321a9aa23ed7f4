"""What learns and scores: the backbone, the two VAEs (features, pixels), the score table and scores,
training and its time budget, inference over batches, devices and the model file."""

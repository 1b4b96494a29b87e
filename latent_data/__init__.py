"""Pre-extracted latents on disk: the names of our format (written by preprocessing/, read by dataset.py) and one
reader per on-disk layout behind dataset.LatentDataset."""

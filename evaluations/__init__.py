"""ADM-compatible evaluation in PyTorch: FID, sFID, Inception Score, precision and recall.

The defaults the command lines show live here, so that their parsers need no torch."""

import cli

DEFAULT_BATCH_SIZE = 250
DEFAULT_REF_PR_IMAGES = 10000  # ADM's reference batches keep 10K images for precision/recall
DEFAULT_WORKERS = min(8, cli.usable_cpus())
INCEPTION_WEIGHTS_ENV = "VAE_REPA_INCEPTION_WEIGHTS"  # a local copy of the Inception weights (inception.py)

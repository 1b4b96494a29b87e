"""Training: the loop and its pieces (training/loop.py); train.py is the command line."""

"""Training: the loop (training/loop.py) and its set-up (training/setup.py); train.py is the command line."""

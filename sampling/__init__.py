"""Sampling from a trained model, shared by generate.py and training's evaluation: the architecture of any checkpoint
(ours, REPA's, SRA's, LightningDiT's), per-sample labels and seeds, the sampling batch, and the PNG / .npz outputs."""

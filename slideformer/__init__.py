"""SlideFormer: full-parameter mixed-precision fine-tuning of LLMs larger than one GPU's memory."""
__version__ = "0.1.0"

"""piip6b: fine-tune Parameter-Inverted Image Pyramid networks with an InternViT-6B branch."""

__version__ = "0.1.0"

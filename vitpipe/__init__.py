"""vitpipe: shard image corpora, pretrain and fine-tune Vision Transformers, share them."""

__version__ = "0.1.0"

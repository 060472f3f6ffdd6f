"""Trainer integrations: PyTorch Lightning (:mod:`ckptdb.lightning`) and the Hugging Face Trainer
(:mod:`ckptdb.hf`). This package holds what they share; it imports no trainer."""

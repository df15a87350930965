"""sip: Semantic-guided Image augmentation with Pre-trained models, and knowledge distillation."""

__version__ = "0.1.0"

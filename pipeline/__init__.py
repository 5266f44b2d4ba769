"""Two-stage brain-MRI tumour pipeline: ResNet50 slice classifier gating a ResUNet segmenter."""

__version__ = "0.3.3"

"""Keras models of both stages, backbone weights and the mixed-precision policy."""

from pipeline.models.model_io import ModelPair, load_model, load_pair, save_model, save_pair

__all__ = ["ModelPair", "load_model", "load_pair", "save_model", "save_pair"]

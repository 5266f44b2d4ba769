"""Keras models of both stages, backbone weights and the mixed-precision policy."""

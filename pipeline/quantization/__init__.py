"""Optional INT8 copies of a pair's models for OpenVINO (`python -m pipeline quantize`).

A stage above evaluation: it quantizes with NNCF and keeps a variant only when `evaluate()` on
the validation patients says the pipeline still scores as it did. Which shipped INT8 files apply
at run time is `pipeline.models.pair_artifact.int8_irs`.

The defaults live here, so `quantize --help` imports nothing heavy.
"""

MAX_DROP = 0.005  # largest validation end-to-end Dice drop a kept INT8 variant may cost
DEFAULT_CALIBRATION_SLICES = 300  # training-patient slices for NNCF's statistics
PRESETS = ("mixed", "performance")  # NNCF QuantizationPreset values; the first is the default

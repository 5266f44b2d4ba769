"""Optional INT8 copies of a pair's models for OpenVINO (`python -m pipeline quantize`).

A stage above evaluation: it quantizes with NNCF and keeps a variant only when `evaluate()` on
the validation patients says the pipeline still scores as it did. Which shipped INT8 files apply
at run time is `pipeline.models.pair_artifact.int8_irs`.
"""

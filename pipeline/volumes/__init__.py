"""Volumes: a patient's study (NIfTI, DICOM series, Kaggle slices) in one type, to the models and back.

`volume` the type (`Volume`), `readers` the registry that reads a path into it, `domain` the
mapping to the models' 256x256 uint8 axial slices and of their masks back to the input grid,
`nifti_out` the mask NIfTI and its measures, `figure` the three-view check of a written mask.
"""

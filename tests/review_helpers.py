"""A small diagnosis for the review-page tests: a Kaggle patient folder, a NIfTI study, a broken file."""

from __future__ import annotations

from pathlib import Path

from pipeline.inference.diagnosis import run_diagnosis
from tests.inference_helpers import stub_pipeline
from tests.test_volumes import model_affine, model_study, write_nifti

CASE = "TCGA_CC_0005_20010505"  # 8 slices, tumour on 1-3
HOSTILE = 'x"><img src=y onerror=alert(1)>.png'  # a file name that is HTML


def diagnosis(synthetic_root: Path, tmp: Path, **kwargs):
    """Diagnose the patient folder, one 8-slice NIfTI study (tumour on slices 2-5), a zero-byte
    PNG and a file named like HTML with the stub pipeline -> (result, OUT)."""
    scans = tmp / "scans"
    scans.mkdir(parents=True)
    data, _ = model_study(n_slices=8, size=64)
    write_nifti(scans / "TCGA_VV_0001.nii.gz", data, model_affine())
    loose = tmp / "loose"
    loose.mkdir()
    (loose / "broken.png").write_bytes(b"")
    (loose / HOSTILE).write_bytes(b"not a png")
    out = tmp / "out"
    result = run_diagnosis(
        [synthetic_root / CASE, scans, loose], out, pipeline=stub_pipeline(**kwargs), progress=False
    )
    return result, out

"""`make evaluate`: run a trained pair over test patients and report every number, labelled.

- `predictions`: the end-to-end pipeline (through `TumorPipeline`) and the segmenter alone over the slices;
- `report`: the numbers (`build_report`) and their `report.json` / `report.md` renderings;
- `figures`: ROC/PR curves, confusion matrix, per-patient Dice, overlays of best and worst patients;
- `evaluate`: choosing models, data and split, and writing everything (`evaluate(...)`).

Submodules are imported on use, so `import pipeline.evaluation` stays light.
"""

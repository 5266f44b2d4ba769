"""Training (`make train`): config, callbacks, the two stages, calibration and the run directory.

- `config`: frozen dataclass config from YAML + preset + `--set` overrides.
- `data_prep`: index, patient split and decoded arrays of the train/val patients.
- `callbacks`, `phase`: Keras callbacks, time budget and one resumable training phase.
- `classifier_training`, `segmenter_training`: stage 1 (ResNet50) and stage 2 (ResUNet).
- `calibration`: the operating point (gate, mask threshold, size limits) chosen on the validation patients.
- `distribute`: the `tf.distribute` strategy.
- `runner`: the run directory and the whole run (`train_run`).

Nothing heavy is imported here; import the submodules you need.
"""

"""Data layer: reading LGG TIFFs, indexing a Kaggle-layout root, patient splits, caches and tf.data."""

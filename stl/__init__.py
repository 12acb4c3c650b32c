"""FAN models with Self-emerging Token Labeling (STL), trained through a DVC pipeline and logged to MLflow.

    dvc repro                                   # the whole pipeline on the embedded digits dataset
    dvc exp run -S model=fan_base_hybrid        # a variant
    stl --help                                  # predict, export, list models
"""

__version__ = "0.1.0"

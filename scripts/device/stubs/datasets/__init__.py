"""Stand-in for Hugging Face ``datasets`` on the GPU machine, which lacks it (and cannot fetch it).

TransformerLens 3.9 imports these names at import time for its dataset utilities, which the
benchmark never calls. Used only by scripts/device/bench.sh; never installed with the project.
"""

from datasets.arrow_dataset import Dataset
from datasets.iterable_dataset import IterableDataset
from datasets.load import load_dataset

__all__ = ["Dataset", "IterableDataset", "load_dataset"]

"""Datasets: one in-memory model and readers for the layouts users have."""

from rsitr.data.dataset import SPLITS, RetrievalDataset
from rsitr.data.karpathy import read_karpathy, write_karpathy
from rsitr.data.loader import LAYOUTS, check_images, detect_layout, load_dataset
from rsitr.data.pir import read_pir
from rsitr.data.precomp import read_precomp

__all__ = [
    "LAYOUTS",
    "SPLITS",
    "RetrievalDataset",
    "check_images",
    "detect_layout",
    "load_dataset",
    "read_karpathy",
    "read_pir",
    "read_precomp",
    "write_karpathy",
]

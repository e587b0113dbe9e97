"""Datasets: one in-memory model and readers for the layouts users have."""

from rsitr.data.dataset import SPLITS, RetrievalDataset

__all__ = ["SPLITS", "RetrievalDataset"]

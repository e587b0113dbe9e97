"""Retrieval models and their registry."""

from rsitr.models.base import Encoding, RetrievalModel
from rsitr.models.registry import ModelSpec, create_model, get_model_spec, list_models, register_architecture

__all__ = ["Encoding", "ModelSpec", "RetrievalModel", "create_model", "get_model_spec", "list_models", "register_architecture"]

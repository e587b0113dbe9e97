"""Training signals beside a model's own loss: cleaner negatives and auxiliary scene supervision.

* **Identical captions** (``train.mask_identical_captions``). Datasets such as UCM-Captions and
  Sydney-Captions repeat captions word for word across images (UCM val: 391 distinct texts among
  1,050 captions). :func:`identical_text_tables` gives the model what it needs to exclude another
  image's copy of an anchor's caption from the negatives of its triplet losses
  (:meth:`rsitr.models.base.RetrievalModel.mask_identical_captions`).
* **Scene supervision** (``train.scene_loss``). A linear classifier on the model's image embedding
  (:attr:`rsitr.models.base.RetrievalModel.scene_embedding`) learns the scene classes of the
  *training* images, and its cross-entropy, times the weight, is added to the loss. It pulls the
  images of one class together in the space the ranking is computed in. The classifier lives in
  the trainer, not in the model: it is saved in the resume state but never in the model bundle,
  and evaluation never sees a label.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rsitr.data.dataset import RetrievalDataset
from rsitr.data.tokenized import SplitData
from rsitr.errors import ConfigError
from rsitr.models.base import Encoding, RetrievalModel

#: Name of the auxiliary term in a step's loss terms (and in metrics.csv).
SCENE_TERM = "scene"


def identical_text_tables(data: SplitData, num_images: int, num_captions: int) -> tuple[Tensor, Tensor]:
    """Text ids of the captions of every image, and of every caption, over the training split ``data``.

    Returns ``(image_texts, caption_texts)``: (num_images, K) with ``-1`` padding (K = the most
    captions of one image) and (num_captions,) with ``-1`` outside ``data``. Equal text ids are equal
    token sequences (``data.text_ids``), the definition of the distinct-text view of evaluation.
    """
    caption_texts = torch.full((num_captions,), -1, dtype=torch.long)
    caption_texts[data.caption_ids] = data.text_ids.long()
    owners = data.caption_image.long()
    per_image = torch.bincount(owners, minlength=num_images)
    width = int(per_image.max()) if len(owners) else 1
    image_texts = torch.full((num_images, max(1, width)), -1, dtype=torch.long)
    order = torch.argsort(owners, stable=True)
    sorted_owners = owners[order]
    starts = torch.cumsum(per_image, 0) - per_image
    slots = torch.arange(len(owners)) - starts[sorted_owners]
    image_texts[sorted_owners, slots] = data.text_ids.long()[order]
    return image_texts, caption_texts


def scene_label_table(dataset: RetrievalDataset, train_images: Tensor) -> tuple[Tensor, list[str]]:
    """(n_dataset_images,) class index of every training image (``-1`` elsewhere) and the class names.

    Only the training split's labels are read: the classes are those seen in it, sorted.
    """
    where = dataset.source if dataset.source is not None else dataset.image_dir
    if dataset.scene_labels is None:
        raise ConfigError(f"{where}: train.scene_loss needs scene labels, and dataset {dataset.name!r} has none")
    ids = train_images.tolist()
    classes = sorted({dataset.scene_labels[i] for i in ids})
    index = {name: k for k, name in enumerate(classes)}
    table = torch.full((dataset.num_images,), -1, dtype=torch.long)
    table[train_images] = torch.tensor([index[dataset.scene_labels[i]] for i in ids], dtype=torch.long)
    return table, classes


class SceneSupervision(nn.Module):
    """A linear scene classifier on one image embedding and its weighted cross-entropy."""

    def __init__(self, key: str, dim: int, labels: Tensor, weight: float) -> None:
        super().__init__()
        self.key, self.weight = key, float(weight)
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.classifier = nn.Linear(dim, int(labels.max()) + 1)

    def forward(self, images: Encoding, image_ids: Tensor) -> Tensor:
        """``weight`` × cross-entropy of the classes of ``image_ids`` from ``images[key]`` (batch mean)."""
        logits = self.classifier(images[self.key].float())
        return self.weight * F.cross_entropy(logits, self.labels[image_ids.to(self.labels.device)], ignore_index=-1)


def scene_supervision(model: RetrievalModel, dataset: RetrievalDataset, train_images: Tensor,
                      sample: dict[str, Tensor], weight: float) -> SceneSupervision:
    """The :class:`SceneSupervision` of ``model`` on ``dataset``'s training labels.

    ``sample``: the features of one training image, encoded once (without gradients) to learn the
    embedding's width. ConfigError when the model names no image embedding to supervise.
    """
    key = model.scene_embedding
    if key is None:
        raise ConfigError(f"train.scene_loss: model {model.architecture or type(model).__name__!r} names no image "
                          "embedding to supervise (scene_embedding)")
    if type(model).training_loss is not RetrievalModel.training_loss:
        raise ConfigError(f"train.scene_loss: model {type(model).__name__} computes its loss in training_loss only")
    labels, _ = scene_label_table(dataset, train_images)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        dim = int(model.encode_image(sample)[key].shape[-1])
    model.train(was_training)
    return SceneSupervision(key, dim, labels, weight)

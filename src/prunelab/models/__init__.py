"""Models: torchvision classifiers with a new head, wrapped as a LightningModule."""

from prunelab.models.classifier import ImageClassifier
from prunelab.models.factory import build_classifier

__all__ = ["ImageClassifier", "build_classifier"]

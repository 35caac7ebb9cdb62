"""Data: the embedded default set, VOC + ScribbleSup and MSRA10K preparation, datasets, transforms, scribbles.

Quick start::

    from nclib.data import ensure_default, VOCScribbleDataset, TrainTransform
    root = ensure_default()                      # generated on first use (deterministic, seconds)
    ds = VOCScribbleDataset(root / "scribble", "train", transform=TrainTransform(crop=96))

Label conventions: ``IGNORE_LABEL`` = 255 (unlabelled scribble pixel / void mask pixel),
``PAD_LABEL`` = 254 (outside the image after padding; not part of the normalized-cut ROI).
"""
from .datasets import IGNORE_LABEL, VOC_CLASS_NAMES, MaskFolderDataset, VOCScribbleDataset, read_image, read_label
from .default import DEFAULT_CLASS_NAMES, default_root, ensure_default, make_default
from .proposal_masks import PROPOSAL_METHODS, proposal_folder, write_proposal_masks
from .scribbles import labelled_fraction, synthesize_scribbles
from .transforms import MEAN_RGB, PAD_LABEL, EvalTransform, TrainTransform, pad_sample, roi_of

__all__ = [
    "IGNORE_LABEL",
    "PAD_LABEL",
    "MEAN_RGB",
    "VOC_CLASS_NAMES",
    "DEFAULT_CLASS_NAMES",
    "default_root",
    "ensure_default",
    "make_default",
    "default_scribble_root",
    "default_salient_root",
    "VOCScribbleDataset",
    "MaskFolderDataset",
    "TrainTransform",
    "EvalTransform",
    "pad_sample",
    "roi_of",
    "synthesize_scribbles",
    "labelled_fraction",
    "read_image",
    "read_label",
    "PROPOSAL_METHODS",
    "proposal_folder",
    "write_proposal_masks",
]


def default_scribble_root(root=None):
    """``ensure_default(root) / "scribble"``: the multi-class set in the VOC + ScribbleSup layout."""
    return ensure_default(root) / "scribble"


def default_salient_root(root=None):
    """``ensure_default(root) / "salient"``: the binary set in the MSRA10K layout."""
    return ensure_default(root) / "salient"

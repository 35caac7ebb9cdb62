"""The two reserved label values of every label map in nclib (scribbles, masks, CE targets).

``IGNORE_LABEL`` (255, VOC's void): an unlabelled scribble pixel or a void mask pixel. It is part of the image, so
it enters the normalized-cut term, but cross-entropy and the scores skip it.
``PAD_LABEL`` (254): outside the image after padding to the crop size. It is outside the normalized-cut ROI
(``roi = label != PAD_LABEL``) and is mapped to ``IGNORE_LABEL`` before cross-entropy and scoring.

Class indices are ``0 .. num_classes - 1``, so ``num_classes`` must stay below ``PAD_LABEL``.
"""
IGNORE_LABEL = 255
PAD_LABEL = 254

__all__ = ["IGNORE_LABEL", "PAD_LABEL"]

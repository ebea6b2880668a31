"""Lazy signature-pair datasets, the seed project's names: a pair file and a dataset root in,
``(pair [2, S, S], label [1, 1])`` out.

``SigDataset_CEDAR_Colab(None, DIR, train=True, image_size=224)`` (also
``SigDataset_GDPS_Colab``, ``SigDataset_BHSig_Colab``) reads ``gray_train.txt``
(``train=False``: ``gray_test.txt``, or any ``pair_file=``), checks that every
image exists, and loads, normalizes, inverts, resizes and (for training)
augments each pair lazily. Defined in ``module/data/pair_dataset.py`` and
``module/data/images.py``; this file is the face users import.
"""
from module.data.images import ImageReadError, imread_tool, load_signature, to_model_input
from module.data.pair_dataset import (
    PairAugmentation,
    PairList,
    SigDataset_BHSig_Colab,
    SigDataset_CEDAR_Colab,
    SigDataset_GDPS_Colab,
    SignaturePairDataset,
)

__all__ = [
    "ImageReadError",
    "PairAugmentation",
    "PairList",
    "SigDataset_BHSig_Colab",
    "SigDataset_CEDAR_Colab",
    "SigDataset_GDPS_Colab",
    "SignaturePairDataset",
    "imread_tool",
    "load_signature",
    "to_model_input",
]

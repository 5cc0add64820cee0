"""Small models and data modules shipped inside the package, so the CLI and the README's main job run after
``pip install`` with no network: scikit-learn's bundled digits, local ``.npz`` image sets, and a small tanh MLP.
"""

from lightning_fastif.zoo.digits import DigitsClassifier, DigitsDataModule, MLPClassifier
from lightning_fastif.zoo.npz import NpzImageDataModule

__all__ = ["DigitsClassifier", "DigitsDataModule", "MLPClassifier", "NpzImageDataModule"]

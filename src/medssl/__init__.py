"""medssl: self-supervised pretraining vs ImageNet transfer on small medical-imaging datasets."""

__version__ = "0.1.0"

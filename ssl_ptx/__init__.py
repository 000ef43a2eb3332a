"""ssl_ptx: semi-supervised pneumothorax segmentation on chest X-rays.

The package root stays light on purpose: ``import ssl_ptx.ema`` must not pull in pandas,
albumentations, smp, timm or pydicom. Import the submodules you need.
"""

__version__ = "0.1.0"

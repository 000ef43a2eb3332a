"""Data layer: the SIIM RLE, DICOM and image reading, dataset readers, the HDF5 cache,
datasets, transforms, samplers and the demo data root.

Submodules are imported on demand (``from ssl_ptx.data import rle``) so that light users do
not pay for pydicom, h5py or albumentations.
"""

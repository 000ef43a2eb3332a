"""Readers for the public external chest X-ray datasets (CheXpert, NIH ChestX-ray14,
Montgomery), each reading the dataset's own published layout into a manifest."""

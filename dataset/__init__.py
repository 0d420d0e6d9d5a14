"""Cityscapes data: the list files, the label table, transforms and a generated demo dataset."""

"""Cityscapes data: the list files, the label table, transforms, prediction files and a generated demo dataset."""

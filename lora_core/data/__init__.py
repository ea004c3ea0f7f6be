"""Datasets: image folders, captions, aspect buckets, image reading."""

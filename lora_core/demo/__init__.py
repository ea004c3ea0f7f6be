"""The offline demo: the shipped tiny base, its pretraining and the concept dataset."""

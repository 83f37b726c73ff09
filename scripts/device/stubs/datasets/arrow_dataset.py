class Dataset:  # a name TransformerLens imports; the benchmark builds none
    pass

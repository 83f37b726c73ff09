def load_dataset(*args, **kwargs):
    raise RuntimeError("datasets is a stub on this machine (scripts/device/stubs): no dataset can be loaded")

"""ebdiff: Early-Bird tickets for cheaper diffusion training.

The library in a few names (each imported on first use, so `import ebdiff` stays light):

    cfg = ebdiff.load_config("demo", ["train.iters=300"])   # a bundled config by name, or a YAML path
    ebdiff.train(cfg, "runs/demo")                          # dense, Early-Bird or pruning run -> summary dict
    unet = ebdiff.load("runs/demo")                         # a diffusers UNet2DModel (a TA-EB run: RoutedUNet)
    sched = ebdiff.scheduler("ddim", "runs/demo")           # a diffusers scheduler on the run's noise schedule
    ebdiff.export("runs/demo", "models/demo")               # a self-contained model folder
"""

__version__ = "0.1.0"

_API = {
    "load": ("runs.interop", "load"),
    "export": ("runs.interop", "export"),
    "scheduler": ("runs.interop", "scheduler"),
    "RoutedUNet": ("runs.interop", "RoutedUNet"),
    "train": ("app.assemble", "train"),
    "load_config": ("config", "load_config"),
    "Config": ("config", "Config"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        from .runs.interop import register_diffusers_samplers

        register_diffusers_samplers()  # the library assembled: diffusers' schedulers are samplers (configs name them)
        module, attr = _API[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'ebdiff' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)

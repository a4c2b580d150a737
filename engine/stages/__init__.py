"""One file per pruning method, each implementing `engine.stage.BlockStage` and registering itself with
`engine.stage.register_stage`. Importing this package imports every module in it, so a new method is one new file
here (plus its solver in `solvers/`)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

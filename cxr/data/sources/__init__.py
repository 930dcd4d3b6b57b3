"""Built-in dataset layouts; importing this package registers them."""

from importlib import import_module
from importlib.util import find_spec

# One module per data source; each registers its layouts with @register_layout.
_MODULES = ("nlm", "nih", "vindr", "folders", "nine")

for _name in _MODULES:
    if find_spec(f"{__name__}.{_name}") is not None:
        import_module(f"{__name__}.{_name}")

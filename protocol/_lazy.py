"""Package exports that load their module on first use, so importing a package stays cheap."""

import sys


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """``__getattr__`` and ``__dir__`` for ``package``, whose ``exports`` map a name to its submodule (``"._x"``)."""

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # __import__, not importlib.import_module: importing importlib (and warnings) costs a CLI command 0.3 ms.
        __import__(package + module)   # "labrun" + "._workspace"
        value = getattr(sys.modules[package + module], name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__

"""kmodd: a declarative kernel-module policy daemon.

Nothing else lives here: importing any submodule must stay cheap.
"""

__version__ = "0.1.0"

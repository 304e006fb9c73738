"""Make the reasondiff plugin available when running `pytest` from the repo root.

The installed package also registers it through the `pytest11` entry point under the
same name, so this line is a no-op there and never registers the plugin twice.
"""

pytest_plugins = ["reasondiff.pytest_plugin"]

"""Only the replication adapter loads pysyncobj: config, services, state and plugins do not."""
import pkgutil
import subprocess
import sys

import pytest

import sealkv.plugins

PLUGIN_MODULES = sorted(m.name for m in pkgutil.walk_packages(sealkv.plugins.__path__,
                                                               "sealkv.plugins."))
NODE_MODULES = ["sealkv.node.config", "sealkv.node.errors", "sealkv.node.data_dir",
                "sealkv.node.serving.kv_service", "sealkv.node.serving.cluster_service",
                "sealkv.node.serving.handle", "sealkv.node.serving.status",
                "sealkv.node.replication.membership", "sealkv.node.replication.settings",
                "sealkv.node.state.machine", "sealkv.node.state.commands"]


@pytest.mark.parametrize("module", NODE_MODULES + PLUGIN_MODULES)
def test_module_does_not_load_pysyncobj(module):
    code = (f"import sys, {module}\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'pysyncobj')\n"
            "assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_plugin_list_is_not_empty():
    assert "sealkv.plugins.encryption.layer" in PLUGIN_MODULES
    assert "sealkv.plugins.encryption.admin" in PLUGIN_MODULES

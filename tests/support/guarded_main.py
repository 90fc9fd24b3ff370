"""``python guarded_main.py main.py --cpu ...`` runs ComfyUI's main.py exactly as ``python main.py --cpu ...``
would, with the test network guard installed first (see network_guard.py): the servers the tests start must
not reach the network either, and what they try is written to their log.
"""
import os
import runpy
import sys

import network_guard            # this file's folder is sys.path[0] until the swap below

network_guard.install(offline_errors=True)
script = os.path.abspath(sys.argv[1])
sys.argv = [sys.argv[1], *sys.argv[2:]]
sys.path[0] = os.path.dirname(script)        # as for ``python main.py``: the script's folder first
runpy.run_path(script, run_name="__main__")
